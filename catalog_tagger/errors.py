"""One base error for everything a user can cause; the CLI maps each to an exit code.

Library code raises these with a one-sentence message meant for the person running the
command. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class CatalogTaggerError(Exception):
    """A foreseeable problem, reported as one line on stderr."""

    exit_code = 1


class UsageError(CatalogTaggerError):
    """Options or arguments that cannot work together."""

    exit_code = 2


class DataError(CatalogTaggerError):
    """Training/evaluation data that is missing, corrupt or inconsistent."""

    exit_code = 3


class ModelError(CatalogTaggerError):
    """A model file that is missing, corrupt, tampered with or incompatible."""

    exit_code = 4


class SourceError(CatalogTaggerError):
    """A tagging source (folder or manifest) that cannot be read at all."""

    exit_code = 5


class OutputError(CatalogTaggerError):
    """The output cannot be written, or another run holds its lock."""

    exit_code = 6


class TooManyErrors(CatalogTaggerError):
    """The run finished and wrote its output, but more images failed than allowed."""

    exit_code = 7


class Interrupted(CatalogTaggerError):
    """Stopped by a signal after committing finished work; --resume continues."""

    exit_code = 130


# A full disk, a quota, a file-size limit or a file system mounted read-only can meet any
# write (a lock file, a report, a checkpoint, a model folder), not only the ones that check for it.
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def as_output_error(exc: OSError) -> OutputError | None:
    """The ``OutputError`` (exit 6) that an ``OSError`` of a full or read-only disk stands
    for; None for any other ``OSError``, which stays a bug with its traceback."""
    if exc.errno not in _CANNOT_WRITE:
        return None
    what = f"cannot write {exc.filename}" if exc.filename else "cannot write the output"
    return OutputError(f"{what}: {exc.strerror or exc}; make room (or a writable place) and run the command again")


# Documented in --help and the README; tests check the two stay in sync with this table.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected failure",
    UsageError.exit_code: "bad usage: invalid options or arguments",
    DataError.exit_code: "training/evaluation data missing or corrupt",
    ModelError.exit_code: "model file missing, corrupt or incompatible",
    SourceError.exit_code: "tagging source missing or unreadable",
    OutputError.exit_code: "output cannot be written or is locked by another run",
    TooManyErrors.exit_code: "output written, but the share of failed images exceeded --max-error-rate",
    Interrupted.exit_code: "interrupted; finished shards are kept, re-run with --resume",
}
