"""A JSONL file of finished cells that survives being killed: one writer at a time, whole-file atomic writes, and a
cut-short last line repaired on opening.

Every record is one JSON object on one line.  A writer holds an exclusive ``flock`` on ``<file>.lock`` for as long
as it is open, so a second sweep writing the same file fails at once instead of interleaving with the first.  Each
append writes the whole file to a temporary file in the same folder, fsyncs it and renames it over the old one, so
a kill at any moment leaves either the old file or the new one, never half a record.  A file that a plain appender
left with a truncated last line (no newline, not valid JSON) is repaired by dropping that fragment; a damaged line
anywhere else is an error, since records after it would be at risk.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path


def _parse(path: Path, text: str) -> tuple[list[dict], bool]:
    """(records, whether the last line was a fragment that was dropped)."""
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not a JSON record ({e}); only a cut-short last line is repaired, "
                             f"so fix or remove this line by hand") from None
    if not tail.strip():
        return records, False
    try:  # a complete record that only lacks its newline is kept
        records.append(json.loads(tail))
        return records, False
    except json.JSONDecodeError:
        return records, True


def read_records(path) -> list[dict]:
    """The records of a results file, without taking its lock (a reader sees the file before or after a write,
    never during one); a cut-short last line is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse(path, path.read_text())[0]


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsynced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors_atomic(tensors: dict, path) -> None:
    """``safetensors`` file of ``tensors`` at ``path``, through a temporary file in the same folder, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class ResultsFile:
    """``with ResultsFile(path) as f: ... f.append(record)``: the locked writer of one results file."""

    def __init__(self, path, log=None):
        self.path = Path(path)
        self.log = log or (lambda _: None)
        self.records: list[dict] = []
        self._fd = None

    def __enter__(self) -> "ResultsFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is being written by another process (it holds {lock}); wait for it to "
                               f"finish or stop it") from None
        self._fd = fd
        if self.path.is_file():
            self.records, repaired = _parse(self.path, self.path.read_text())
            if repaired:
                self.log(f"{self.path}: dropped a cut-short last line (a write that was interrupted)")
                self._write()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _write(self) -> None:
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        if self._fd is None:
            raise RuntimeError("ResultsFile.append outside its with-block (the file is not locked)")
        self.records.append(record)
        self._write()

    def keys(self) -> set:
        return {r.get("key") for r in self.records}
