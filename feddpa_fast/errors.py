"""The project's error types share one base, so that a caller (the ``feddpa-fast`` CLI among
them) can catch what the project raises for bad input or bad state, and nothing else: a bug,
in this code or in torch, keeps its traceback. Each concrete type also derives from the
built-in its meaning belongs to (ValueError, FileNotFoundError, ...), so ``except ValueError``
keeps working."""
from __future__ import annotations

__all__ = ["FeddpaError", "MissingFileError", "RunExistsError"]


class FeddpaError(Exception):
    """Base of every error feddpa_fast raises for bad input or bad state; its message names the
    argument, file or option at fault."""


class MissingFileError(FeddpaError, FileNotFoundError):
    """A file or directory a command needs is not there (the message names it)."""


class RunExistsError(FeddpaError, FileExistsError):
    """The output directory already holds a run (and it was not asked to resume)."""
