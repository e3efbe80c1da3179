"""megatron-core's rank-0-only file writes, made safe to fail inside its collective sequences.

A distributed checkpoint save has three files that only rank 0 writes, each between collectives of all ranks:
``common.pt`` (before the planning gather), DCP's ``.metadata`` (between the gather of the write results and
the broadcast of their failures) and ``metadata.json`` (before a barrier). If one of those writes raises (a full
disk, an I/O error), rank 0 leaves the sequence while the other ranks wait in the next collective: the run
hangs. Under :func:`deferring`, such an error is kept instead of raised, rank 0 goes through the same
collectives as everyone, and the caller (the save protocol's ``_collectively``) fails the save on every rank
with it. Outside ``deferring`` the writes behave as megatron-core wrote them.
"""

import contextlib
import functools
from typing import List, Optional

_deferred: Optional[List[BaseException]] = None  # the errors of the active `deferring` block


@contextlib.contextmanager
def deferring():
    """Collect the rank-0 writes' errors of the block; yields the list they land in."""
    global _deferred
    _install()
    outer, _deferred = _deferred, []
    try:
        yield _deferred
    finally:
        _deferred = outer


def _deferred_on_failure(write):
    @functools.wraps(write)
    def guarded(*args, **kwargs):
        if _deferred is None:
            return write(*args, **kwargs)
        try:
            return write(*args, **kwargs)
        except Exception as err:
            _deferred.append(err)

    guarded.defers_rank0_errors = True
    return guarded


def _install() -> None:
    """Wrap the three writers once (megatron-core 0.16.1's names; a test fails a write of each kind)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    for owner, name in ((TorchCommonSaveStrategy, "save_common"), (FileSystemWriterAsync, "finish"),
                        (serialization, "save_config")):  # fmt: skip
        write = getattr(owner, name)
        if not getattr(write, "defers_rank0_errors", False):
            setattr(owner, name, _deferred_on_failure(write))
