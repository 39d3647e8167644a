"""ImcapError, the base of every error that is the user's to fix, and its one-line report.

The `imcap` command and the launch scripts (which call it) catch ImcapError once, at the top: the
error is printed as one line, `imcap: <message>`, and the process exits with EXIT_USER_ERROR, without a
traceback. Any other exception is a bug and keeps its traceback.

A new error joins by deriving from ImcapError and from the builtin it is (ValueError, RuntimeError,
OSError), so that `except ValueError` clauses written before it keep catching it:

    class LockError(ImcapError, RuntimeError):
        pass

Its message names the file, directory or config key that is wrong and what would be right. Its
constructor takes that one message: a DataLoader worker or a process pool re-creates an error from
its message to raise it in the parent process.
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_USER_ERROR = 2  # as argparse exits for bad arguments


class ImcapError(Exception):
    """A config, file or directory that imcap cannot use as given; the message says which, and why."""

    label = ""  # printed before the message, e.g. "config error"


class PathError(ImcapError, OSError):
    """A file or directory named on the command line that cannot be read or written."""


def path_error(path: str | Path, cause: OSError | str, what: str = "cannot read") -> PathError:
    """PathError("<what> <path>: <cause in words>")."""
    error = PathError(f"{what} {path}: {cause if isinstance(cause, str) else reason(cause)}")
    error.errno = getattr(cause, "errno", None)
    return error


def reason(error: OSError | UnicodeDecodeError) -> str:
    """An OSError's cause in words, without the errno number and the path (the message names the path)."""
    if getattr(error, "errno", None) == errno.ELOOP:  # strerror says "too many levels", hiding that links go round
        return "a symbolic link loop (ELOOP): the link leads back to itself"
    words = getattr(error, "strerror", None)
    return words[:1].lower() + words[1:] if words else str(error)


def error_line(error: ImcapError, rank: int = 0) -> str:
    """The error as the one line the command prints: `imcap: [label: ]message[ (rank N)]`."""
    text = str(error)
    # raised in a DataLoader worker: torch re-raises it with the worker's traceback as its message, whose
    # last line is the error as raised there
    raised_as = f"\n{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and raised_as in text:
        where = text.partition("\n")[0]
        text = f"{text.rpartition(raised_as)[2]} ({where.removeprefix(f'Caught {type(error).__name__} ').rstrip('.')})"
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    label = f"{error.label}: " if error.label else ""
    return f"imcap: {label}{message}{f' (rank {rank})' if rank else ''}"
