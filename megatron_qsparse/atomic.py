"""Writes that are all or nothing: a file or directory is made under a temporary name beside its destination (the
same file system, so the final rename is atomic) and renamed into place only when complete. A failure removes
the temporary and leaves the destination as it was. The one home of this rule for the whole package."""

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside ``path``, unique per process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """``path`` opened for writing (``"w"``: UTF-8 text, ``"wb"``: bytes) under a temporary name; synced and renamed
    to ``path`` when the block completes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path, "partial")
    try:
        with open(temporary, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as stream:
        stream.write(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1))


@contextlib.contextmanager
def atomic_directory(output: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``output`` that becomes ``output`` when the block completes. An existing
    non-empty ``output`` is refused unless ``replace`` (then it is swapped out only after the new one is whole)."""
    output = Path(output)
    if not replace and output.exists() and any(output.iterdir()):
        raise FileExistsError(errno.EEXIST, "exists and is not empty; choose a new output directory", str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir with the usual permissions (mkdtemp's would be 0700).
    staging = temporary_sibling(output)
    staging.mkdir()
    try:
        yield staging
        if output.exists():
            old = temporary_sibling(output, "old")
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
