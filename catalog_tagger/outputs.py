"""The files a tagging run writes, and the rules that keep it off files it does not own.

A run writes OUT, ``OUT.summary.json``, ``OUT.lock`` and the shard store ``OUT.parts/``.
Before any work starts:

- OUT must not exist yet, be empty, or be an output of this program (a Parquet file with
  our metadata, a CSV with our header): a typo in --out must not replace a spreadsheet, a
  photo, a manifest or a file derived from an output that happen to bear that name. An
  output its owner made read-only is not replaced either, even by root: a snapshot frozen
  on purpose. A replaced output keeps its permission bits. A symbolic link is written through: the
  link stays and its target is replaced atomically, with the lock, summary and parts
  beside the target. A device (``/dev/null``), pipe, socket or folder is refused.
- None of the four may be one of the run's inputs (the manifest, the model, ``--root``);
  ``--incremental PREV`` may be OUT itself, since PREV is read whole before OUT is replaced.
- The lock is opened without following links and must be a regular file with no other
  hard link, so a planted ``OUT.lock -> victim`` cannot make the run write into the victim.
- ``OUT.parts/`` is only reused or removed when it is a real folder holding the run state
  that this program writes (``_run.json``); anything else there belongs to someone else.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError, UsageError
from .schema import OUTPUT_COLUMNS, SCHEMA_VERSION_KEY

RUN_STATE = "_run.json"


def summary_path(out: Path) -> Path:
    """``tags.parquet`` -> ``tags.parquet.summary.json``: one summary per output, even for
    ``tags.parquet`` and ``tags.csv`` side by side."""
    return out.with_name(out.name + ".summary.json")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_output(out: Path) -> Path:
    """The path the output is really written to (see the module docstring), or an
    ``OutputError`` saying in one sentence why this --out cannot be used."""
    out = Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.parent.is_dir():
            raise OutputError(f"--out {out} is a link to {target}, whose folder does not exist")
        out = target
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot use --out {out}: {exc.strerror or exc}") from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"--out {out} is {_kind(st.st_mode)}, not a file; name a .parquet or .csv file")
    if not out.parent.is_dir():
        raise OutputError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {out.parent} is not writable")
    try:
        for path, what in ((summary_path(out), "summary"), (lock_path(out), "lock")):
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise OutputError(f"{path} (the run's {what} file) exists and is not a plain file; "
                                  "remove it or choose another --out")
        parts = parts_dir(out)
        if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
            raise OutputError(f"{parts} (the run's shard store) exists and is not a folder; "
                              "remove it or choose another --out")
    except OSError as exc:  # a name too long for the file system once the suffixes are added
        raise OutputError(f"cannot use --out {out}: {exc.strerror or exc} (for {exc.filename})") from exc
    return out


def refuse_foreign(out: Path) -> None:
    """Refuse an existing OUT that this program did not write, or that its owner made read-only."""
    try:
        st = out.stat()
    except FileNotFoundError:
        return
    if not st.st_mode & stat.S_IWUSR:
        # Renaming over a file needs only the folder's write permission (and root may write
        # anything), so the owner's "keep this as it is" must be checked here.
        raise OutputError(f"--out {out} is read-only, so its owner protected it; tag does not replace it: "
                          "make it writable (chmod u+w) or choose another --out")
    if st.st_size > 0 and not is_tag_output(out):
        raise OutputError(f"--out {out} exists and is not a catalog-tagger output; tag replaces only its own "
                          "outputs: move that file away or choose another --out")


def output_mode(out: Path) -> int | None:
    """The permission bits of an existing OUT, which its replacement keeps (a private 0600
    output stays private); None when there is none."""
    try:
        return stat.S_IMODE(out.stat().st_mode) & 0o777
    except FileNotFoundError:
        return None


def is_tag_output(path: Path) -> bool:
    """Whether ``path`` is a Parquet file with our metadata, or a CSV with our header."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
        if head.startswith(b"PAR1"):
            # Every version wrote this key; a file derived from an output with pandas does not have it.
            return SCHEMA_VERSION_KEY.encode() in (pq.read_schema(path).metadata or {})
        first = head.decode("utf-8-sig", errors="replace").splitlines()[:1]
        names = next(csv.reader(first), []) if first else []
    except (OSError, pa.ArrowException, csv.Error):
        return False
    return is_tag_csv_header(names)


def is_tag_csv_header(names: list[str]) -> bool:
    """Our columns in the order ``writers.flatten_for_csv`` writes them: up to confidence,
    ``label_k, score_k`` for k = 2.. (none with --top-k 1), then the rest of ours; the
    manifest's pass-through columns may follow."""
    topk = OUTPUT_COLUMNS.index("topk_labels")
    head, tail = list(OUTPUT_COLUMNS[:topk]), list(OUTPUT_COLUMNS[topk + 2:])
    if names[:len(head)] != head:
        return False
    at, k = len(head), 2
    while names[at:at + 2] == [f"label_{k}", f"score_{k}"]:
        at, k = at + 2, k + 1
    return names[at:at + len(tail)] == tail


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def refuse_inputs(out: Path, inputs: Iterable[tuple[str, Path | None]], previous: Path | None = None) -> None:
    """Refuse an OUT (or its summary, lock or parts) that is one of the run's inputs.

    ``previous`` (--incremental) may be OUT itself, never the summary, lock or parts.
    """
    ours = [(out, "--out"), (summary_path(out), "the summary file"), (lock_path(out), "the lock file"),
            (parts_dir(out), "the shard store")]
    candidates = [(what, Path(p)) for what, p in inputs if p is not None]
    if previous is not None:
        candidates.append(("--incremental", Path(previous)))
    for written, name in ours:
        for what, path in candidates:
            if what == "--incremental" and written == out:
                continue
            if _same(written, path):
                raise UsageError(f"{name} ({written}) is the same file as {what} ({path}); "
                                 "choose another --out so that the input is not overwritten")


def open_lock(path: Path) -> IO[str]:
    """Open (creating if needed) the lock file without following a link, and only if it
    is a regular file that no other name points to."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == getattr(os, "ELOOP", 40):
            raise OutputError(f"{path} is a symbolic link; a lock file must be a plain file: remove it") from None
        raise OutputError(f"cannot create lock file {path}: {exc.strerror or exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OutputError(f"{path} is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'hard-linked'}; "
                          "a lock file must be a plain file of its own: remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+")


def owned_parts(parts: Path) -> bool:
    """Whether ``parts`` is a shard store this program made (a real folder with its run state)."""
    return parts.is_dir() and not parts.is_symlink() and (parts / RUN_STATE).is_file()


def refuse_foreign_parts(parts: Path) -> None:
    if parts.exists() and not owned_parts(parts) and any(parts.iterdir()):
        raise OutputError(f"{parts} exists and was not made by catalog-tagger; it is left alone: "
                          "move it away or choose another --out")
