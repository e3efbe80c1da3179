"""Exit codes and one-line errors, the same for every command of the project.

A command's ``main`` is wrapped by :func:`run_command`: a user mistake (:class:`UserError` and its kinds, the
project's older ``ValueError`` subclasses) or an environmental failure (permission denied, read-only file system,
no space left, missing file) becomes one line on stderr naming the file or key and the fix, and a documented exit
code (docs/errors.md). Anything else is a bug and keeps its traceback.

Codes follow BSD ``sysexits.h`` where one fits, so batch scripts can tell "fix the input" from "retry":

====  ==============================================================================================
0     done
1     an unexpected error (a bug: the traceback is printed)
2     usage or configuration error (the key and the fix are named)
3     training aborted: too many consecutive non-finite losses (the last checkpoint is intact)
65    bad data: a corrupt or unsafe checkpoint, a corpus that does not match the tokenizer
66    an input file or directory does not exist
73    an output cannot be created: permission denied, read-only file system, already exists
74    I/O error: no space left on device, quota exceeded, another read/write failure
75    stopped by SIGTERM/SIGUSR1 after writing a checkpoint: run the same command again to resume
130   interrupted (SIGINT / Ctrl-C); training first finishes the step and writes a checkpoint
====  ==============================================================================================
"""

import errno
import os
import signal
import sys
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_IO = 74
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM, in the tools that do not checkpoint (128 + 15)


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole one-line message."""

    exit_code = EXIT_USAGE


class DataError(UserError):
    """Input data that cannot be used as it is: corrupt, unsafe, or made for something else."""

    exit_code = EXIT_DATA


class CheckpointError(DataError):
    """A checkpoint that is damaged, incomplete or unsafe to load; the message names the file."""


# errno -> (what happened, exit code)
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", EXIT_IO),
    errno.EDQUOT: ("disk quota exceeded", EXIT_IO),
    errno.EFBIG: ("file too large", EXIT_IO),
    errno.EIO: ("I/O error", EXIT_IO),
    errno.EROFS: ("read-only file system", EXIT_CANT_CREATE),
    errno.EACCES: ("permission denied", EXIT_CANT_CREATE),
    errno.EPERM: ("operation not permitted", EXIT_CANT_CREATE),
    errno.EEXIST: ("already exists", EXIT_CANT_CREATE),
    errno.ENOENT: ("no such file or directory", EXIT_NO_INPUT),
    errno.ENOTDIR: ("not a directory", EXIT_NO_INPUT),
    errno.EISDIR: ("is a directory", EXIT_USAGE),
}

_CODE_BY_TYPE = {
    FileNotFoundError: EXIT_NO_INPUT,
    NotADirectoryError: EXIT_NO_INPUT,
    FileExistsError: EXIT_CANT_CREATE,
    PermissionError: EXIT_CANT_CREATE,
    IsADirectoryError: EXIT_USAGE,
}


def describe_os_error(err: OSError, needed_bytes: Optional[int] = None) -> tuple:
    """``(one line, exit code)`` for an OSError: what happened, to which path, and (for a full disk) how much
    room there is and was needed when known."""
    if err.errno is None:  # raised with a message only, e.g. FileNotFoundError("... does not exist")
        return str(err) or type(err).__name__, _CODE_BY_TYPE.get(type(err), EXIT_IO)
    what, code = _OS_ERRORS.get(err.errno, (err.strerror or type(err).__name__, EXIT_IO))
    if err.strerror and err.strerror != os.strerror(err.errno):  # our own wording: keep it
        what = err.strerror
    paths = [p for p in (err.filename, err.filename2) if p]
    where = " -> ".join(str(p) for p in paths) if paths else "(no path given)"
    line = f"{where}: {what}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and paths:
        line += _room(str(paths[0]), needed_bytes)
    return line, code


def _room(path: str, needed_bytes: Optional[int]) -> str:
    import shutil

    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        return ""
    text = f" ({free / 2**20:,.1f} MiB free"
    if needed_bytes:
        text += f", {needed_bytes / 2**20:,.1f} MiB needed"
    return text + "); free space or choose another location"


def os_error(errno_code: int, path, needed_bytes: Optional[int] = None) -> OSError:
    """An OSError for ``path`` as the OS would raise it, for failures that libraries report without an errno
    (a full disk inside torch's writer surfaces as ``RuntimeError: unexpected pos``)."""
    err = OSError(errno_code, os.strerror(errno_code), str(path))
    err.needed_bytes = needed_bytes
    return err


def exit_code_and_message(err: BaseException) -> Optional[tuple]:
    """``(code, line)`` for an error a user should see as one line, or None for a bug."""
    if isinstance(err, UserError):
        return err.exit_code, str(err)
    if isinstance(err, OSError):
        line, code = describe_os_error(err, getattr(err, "needed_bytes", None))
        return code, line
    if isinstance(err, ValueError) and type(err).__module__.startswith("megatron_qsparse"):
        return EXIT_USAGE, str(err)  # the project's own older error kinds (ConfigError, TokenizerError, ...)
    return None


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv=None, name: Optional[str] = None) -> int:
    """Run a command's ``main``; user and environment errors become one line on stderr and their exit code."""
    name = name or os.path.basename(sys.argv[0] or "command")
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, OSError, ValueError) as err:
        known = exit_code_and_message(err)
        if known is None:
            raise
        code, line = known
        print(f"{name}: error: {line}", file=sys.stderr)
        return code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by `run_tool`'s handler: like KeyboardInterrupt, it unwinds through every
    `finally`, which removes the temporary output, and no `except Exception` stops it."""


def run_tool(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None, name: str) -> int:
    """`run_command` for a command that writes through temporaries: SIGTERM (a scheduler's stop, `kill`)
    unwinds like SIGINT, so the temporaries are removed either way; the exit status is 130 for SIGINT and
    `EXIT_TERMINATED` (143) for SIGTERM."""
    installed, previous = _raise_on_sigterm()
    try:
        return run_command(main, argv, name)
    except Terminated:
        print(f"{name}: terminated (SIGTERM); the partial output was removed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_on_sigterm() -> tuple[bool, object]:
    """Install the SIGTERM handler: (whether it could be, outside the main thread it cannot; the one replaced)."""

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated()

    try:
        return True, signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        return False, None
