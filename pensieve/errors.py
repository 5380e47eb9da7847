"""Errors a user fixes by changing what they asked for: the CLI prints them as one line, no traceback."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: missing, an unsupported architecture or format."""


class UsageError(ValueError):
    """Options that cannot work together, or a resource the command cannot take (a port in use)."""
