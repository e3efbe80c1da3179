"""Who owns a run directory: one live run at a time (a lock), and checkpoints that belong to one run (a run id).

The lock is an advisory ``flock`` on ``<dir>/.lock``, held for the whole run by rank 0 (the kernel drops it when
the process dies, so a killed run never leaves a stale lock). The file names its holder, so a second run is
refused with who holds it. Each checkpoint records the ``run_id`` of the run that wrote it: a resumed run
continues under that id, and a run only ever overwrites or prunes checkpoints carrying its own id.
"""

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import List, Optional

from megatron_qsparse.errors import EXIT_CANT_CREATE, UserError

LOCK_FILE = ".lock"


class RunDirectoryInUse(UserError):
    exit_code = EXIT_CANT_CREATE


class ForeignCheckpoints(UserError):
    """A new run would share a checkpoint directory with another run's checkpoints."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


class RunLock:
    """An exclusive lock on each of ``directories`` (created if missing); ``release`` or process exit frees it."""

    def __init__(self, directories: List[Path]):
        self.files = []
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        try:
            for directory in dict.fromkeys(Path(d).resolve() for d in directories):
                self.files.append(self._lock(directory, holder))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _lock(directory: Path, holder: dict):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        stream = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            other = stream.read().strip() or "unknown holder"
            stream.close()
            raise RunDirectoryInUse(
                f"{directory} is in use by another run ({_describe(other)}); wait for it to end, or give this run "
                f"its own directory (log.run_dir=..., checkpoint.dir=...)"
            ) from None
        stream.seek(0)
        stream.truncate()
        stream.write(json.dumps(holder) + "\n")
        stream.flush()
        return stream

    def release(self) -> None:
        for stream in self.files:
            stream.close()  # closing the descriptor drops the flock
        self.files = []


def _describe(holder_text: str) -> str:
    try:
        h = json.loads(holder_text)
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command'][:120]}"
    except (ValueError, KeyError, TypeError):
        return holder_text[:200]


def refuse_foreign_checkpoints(checkpoint_dir: Path, existing: List[Path], init_from: Optional[str]) -> None:
    """A run that does not resume must not start in a directory holding another run's checkpoints: its saves
    would overwrite theirs step for step, and pruning would mix the two."""
    if not existing:
        return
    names = ", ".join(p.name for p in existing[-3:])
    hint = (
        "resume it (checkpoint.resume=true, the default), or start this run in a new directory "
        "(--set log.run_dir=NEW or --set checkpoint.dir=NEW)"
    )
    if init_from:
        hint = f"keep train.init_from={init_from} and start this run in a new directory (--set log.run_dir=NEW)"
    raise ForeignCheckpoints(f"{checkpoint_dir} holds another run's checkpoints ({names}); {hint}")
