"""How a KV hand-off can fail: one typed exception per reason (services map them to gRPC statuses)."""


class KVTransferError(Exception):
    """A KV hand-off failed; subclasses say why."""


class KVLayoutMismatch(KVTransferError):
    """Prefill and decode pools differ; the message names each differing field."""


class KVTransferNotFound(KVTransferError):
    """The sender has no live offer with this id (never offered, expired, cancelled or pulled)."""


class KVTransferTimeout(KVTransferError):
    """The transfer did not finish within its deadline."""


class KVSizeMismatch(KVTransferError):
    """The pull expects a different number of blocks than the offer holds."""


class KVInvalidPull(KVTransferError):
    """The pull request itself is malformed (bad id, byte count that does not match its layout, ...)."""
