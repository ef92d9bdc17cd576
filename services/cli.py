"""`tandem` command line: one entry point, a module per subcommand (imported only when used)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with `main(argv: list[str]) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("services.launcher", "start a frontend plus prefill and decode workers locally"),
    "frontend": ("services.frontend.main", "run the frontend service"),
    "prefill": ("services.prefill.main", "run a prefill worker"),
    "decode": ("services.decode.main", "run a decode worker"),
    "worker": ("services.decode.colocated", "run a colocated worker (prefill and decode in one engine)"),
    "generate": ("services.client", "stream an answer from a running frontend"),
    "offline": ("services.offline", "batch inference from a JSONL file in one process"),
}


def _usage() -> str:
    lines = ["usage: tandem <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tandem: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
