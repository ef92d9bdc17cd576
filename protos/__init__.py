"""Tandem's protobuf definitions and their generated stubs (built on first import)."""

from protos.build import ensure_built as _ensure_built

_ensure_built()
