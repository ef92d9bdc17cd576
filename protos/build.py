"""Generates the Python protobuf and gRPC stubs for every .proto file in this folder.

Run as `python -m protos.build`; `protos/__init__.py` also calls `ensure_built()` on import so a fresh
checkout (or a machine with a different protobuf runtime) never uses stale or missing stubs. Both protos'
`SamplingParams` messages are written from the table of sampling parameters by
`python -m common.engine.sampling_protos`, which then builds.
The stubs are build outputs and are not committed.
"""

from __future__ import annotations

import pathlib
import sys

PROTOS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent


def _stale_protos() -> list[pathlib.Path]:
    stale = []
    for proto in sorted(PROTOS_DIR.glob("*.proto")):
        generated = [proto.with_name(proto.stem + suffix) for suffix in ("_pb2.py", "_pb2_grpc.py")]
        proto_mtime = proto.stat().st_mtime
        if any(not g.exists() or g.stat().st_mtime < proto_mtime for g in generated):
            stale.append(proto)
    return stale


def ensure_built(force: bool = False) -> None:
    """Regenerates the stubs of every .proto newer than its stubs (or all of them when `force`)."""
    protos = sorted(PROTOS_DIR.glob("*.proto")) if force else _stale_protos()
    if not protos:
        return
    from grpc_tools import protoc  # imported lazily: only needed when something is stale
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={REPO_ROOT}",
        f"--pyi_out={REPO_ROOT}",
        f"--grpc_python_out={REPO_ROOT}",
        *[str(p.relative_to(REPO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {[p.name for p in protos]}")


if __name__ == "__main__":
    ensure_built(force="--force" in sys.argv)
    print("protos built")
