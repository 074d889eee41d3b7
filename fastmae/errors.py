"""fastmae's own errors: what a user can fix (a flag, a file, an input), said in one line by the
command-line entry points (``--debug`` adds the traceback). Anything else is a bug and keeps its
traceback. Each also derives from the built-in error it refines, so ``except ValueError`` and the
like keep working."""
from __future__ import annotations


class FastMAEError(Exception):
    """An error the user can fix; its message says what and how."""


class UsageError(FastMAEError, ValueError):
    """A value that cannot be used: a flag, a shape, a dtype, a setting."""


class MissingPathError(FastMAEError, FileNotFoundError):
    """A file or folder that is not there (a data folder, a checkpoint)."""


class BackendUnavailableError(FastMAEError, RuntimeError):
    """An explicitly requested backend (kernels, attention, norm, optimizer, data loader) cannot run
    here; the message says why."""
