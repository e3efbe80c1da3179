"""Writing and resuming checkpoints: the model and the optimizer state as megatron-core distributed checkpoints
(both loadable under any TP/PP/DP/EP layout, world size and ZeRO stage: ``optimizer_state.py``), each rank's RNG
states, the manifest and the trainer state (step, run id, config, layout, samples consumed). The format, its
checks and its reading live in ``model/checkpoint.py``.

A save (:func:`save_checkpoint`, collective) writes everything under ``<root>/.tmp-step_0000100``; once every
rank's files are on disk the ranks hash a share of them each and rank 0 writes ``manifest.json`` (size and
sha256 of every file), then ``trainer_state.json``, renames the directory into place, points ``latest`` at it
and prunes. So a killed save never leaves a directory that ``find_latest`` would pick, and a file damaged later
is found by its checksum instead of being loaded. A failed save removes the temporary directory and leaves
``latest`` and the older checkpoints as they were; on a full disk it raises ``errors.os_error(ENOSPC, ...)``
(exit 74) instead of torch's ``unexpected pos`` / ``basic_ios::clear``.

Runs: ``trainer_state["run_id"]`` names the run. A save refuses to overwrite a ``step_*`` directory of another
run, and pruning only removes this run's checkpoints (oldest step first, keeping the ``keep`` newest that
verify, never the one just written or the one ``latest`` names).

Loading: the model through ``model/safe_load.py`` (nothing in a checkpoint can run code), our own files with
``weights_only=True``.
"""

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_qsparse import atomic, errors
from megatron_qsparse.errors import CheckpointError
from megatron_qsparse.model import safe_load
from megatron_qsparse.model.checkpoint import (  # noqa: F401  (the reading side, re-exported for the trainer)
    LATEST,
    MANIFEST,
    STATE_FILE,
    complete_checkpoints,
    find_latest,
    load_model,
    rank_file_name,
    read_model_config,
    read_trainer_state,
    resolve_checkpoint,
    step_name,
    verify_checkpoint,
)
from megatron_qsparse.model.manifest import hash_files, listed_files, read_manifest, write_manifest
from megatron_qsparse.model.safe_load import load_weights_only
from megatron_qsparse.parallel.host_collectives import all_reduce_host
from megatron_qsparse.training import rank0_writes
from megatron_qsparse.training.optimizer import load_zero_partition
from megatron_qsparse.training.optimizer_state import load_optimizer_state, sharded_optimizer_state

# Below this much free space a failed save is taken for a full disk (torch's writers lose the errno).
FULL_DISK_MARGIN = 64 * 2**20
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def _rank_file(directory: Path, kind: str) -> Path:
    return directory / kind / rank_file_name(dist.get_rank())


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rederive_rng(seed: int) -> None:
    """Fresh RNG states for a resume under another layout (whose ranks' saved streams do not map onto the new
    ranks): torch, Python and NumPy from ``seed``, megatron-core's tracker per TP/EP rank from it."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model_parallel_cuda_manual_seed(seed)


# ---- saving -------------------------------------------------------------------------------------------------
def save_checkpoint(root: Path, step: int, model, engine, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory. CheckpointError (before anything is
    written) when ``step_*`` exists and belongs to another run; OSError ENOSPC when the disk fills up."""
    from megatron.core import dist_checkpointing

    save = _Save(Path(root), step, trainer_state, keep)
    optimizer_state = save.begin(model, engine)

    def write_rank_files():  # DCP's saves fail on every rank together; the RNG file is this rank's alone
        dist_checkpointing.save(model.sharded_state_dict(), str(save.tmp / "model"))
        dist_checkpointing.save(optimizer_state, str(save.tmp / "optimizer"))
        save_rng_state(_rank_file(save.tmp, "rng"))

    save.collectively(write_rank_files)
    save.conclude()
    return save.final


def start_background_save(root: Path, step: int, model, engine, trainer_state: dict, keep: int, queue) -> Path:
    """``save_checkpoint`` with the files written by a forked writer process per rank (megatron-core's async
    save), so training goes on meanwhile. The state is taken now: GPU tensors are staged to host memory here,
    and the fork gives the writer a copy-on-write snapshot of host memory. ``queue`` (megatron-core's
    ``AsyncCallsQueue``) runs the rest later, on every rank together, when its ``maybe_finalize_async_calls``
    finds all writers done: DCP's metadata, then the same hashing, manifest, rename, ``latest`` and pruning as a
    blocking save, under the same failure rule (the temporary directory goes, ``latest`` stays). Returns the
    final directory it will have."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    save = _Save(Path(root), step, trainer_state, keep)
    optimizer_state = save.begin(model, engine)

    def plan():
        states = (("model", model.sharded_state_dict()), ("optimizer", optimizer_state))
        requests = [dist_checkpointing.save(sd, str(save.tmp / sub), async_sharded_save=True) for sub, sd in states]
        save_rng_state(_rank_file(save.tmp, "rng"))
        return requests

    requests = save.collectively(plan)
    writes = []
    for request in requests:
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()  # megatron-core's convention: the write buckets, staged to host
        writes.append((request.async_fn, args, request.async_fn_kwargs))
    metadata = [fn for request in requests for fn in request.finalize_fns]

    def write():  # in the writer process: local files only, no collectives
        for fn, args, kwargs in writes:
            if fn is not None:
                fn(*args, **kwargs)

    def finish():
        save.collectively(lambda: [fn() for fn in metadata])  # raises on every rank if a writer failed
        save.conclude()

    queue.schedule_async_request(AsyncRequest(write, (), [finish]))
    return save.final


class _Save:
    """One checkpoint on its way: its directories, the decisions every rank shares, and the protocol's steps."""

    def __init__(self, root: Path, step: int, trainer_state: dict, keep: int):
        self.root, self.step, self.trainer_state, self.keep = root, step, trainer_state, keep
        self.final, self.tmp = root / step_name(step), root / f".tmp-{step_name(step)}"

    def begin(self, model, engine):
        """Refuse another run's step, make the temporary directory, gather the optimizer state (returned)."""
        run_id = self.trainer_state.get("run_id")
        conflict = _from_rank0(lambda: _ownership_conflict(self.final, run_id))
        if conflict:
            raise CheckpointError(conflict)
        self.needed = _from_rank0(lambda: _size_of_newest(self.root))

        def prepare():
            if dist.get_rank() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)  # a torn save of the same step
                for sub in ("model", "optimizer", "rng"):
                    (self.tmp / sub).mkdir(parents=True)

        self.collectively(prepare)  # its all-reduce is also the barrier before the writes
        # Gathered outside the failure protocol: its all-reduces must not meet a rank that left for that one's.
        return sharded_optimizer_state(model, engine)

    def collectively(self, action):
        return _collectively(action, self.final, self.tmp, self.needed)

    def conclude(self) -> None:
        """All files on disk: every rank hashes a share, rank 0 writes the manifest and moves it into place."""
        share = self.collectively(lambda: _hash_my_share(self.tmp))
        files = {name: entry for each in _gathered(share) for name, entry in each.items()}

        def finish():
            if dist.get_rank() == 0:
                _finish(self.root, self.final, self.tmp, files, self.trainer_state, self.step, self.keep)

        self.collectively(finish)
        dist.barrier()


def _finish(root: Path, final: Path, tmp: Path, files: dict, trainer_state: dict, step: int, keep: int) -> None:
    """Rank 0, all files on disk: manifest, trainer state, rename, ``latest``, prune."""
    run_id = trainer_state.get("run_id")
    write_manifest(tmp, files, run_id=run_id, step=step)
    atomic.write_json(tmp / STATE_FILE, dict(trainer_state, step=step))
    _move_into_place(tmp, final)
    _write_latest(root, final.name)
    _prune(root, keep, run_id, protected={final})


def _hash_my_share(tmp: Path) -> dict:
    """This rank's share of the manifest's hashing (every rank sees the whole directory after the barrier)."""
    names = listed_files(tmp)
    return hash_files(tmp, names[dist.get_rank() :: dist.get_world_size()])


def _gathered(share: dict) -> list:
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    return shares


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` (this run's own earlier save of the step) only once the new one is whole."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = atomic.temporary_sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    atomic.write_text(root / LATEST, name + "\n")


def _from_rank0(compute):
    """``compute()`` on rank 0, its value on every rank (a decision all ranks must share)."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_UNKNOWN = object()


def _owner(directory: Path):
    """The run id recorded in a checkpoint (None for one written before run ids), or _UNKNOWN when neither its
    trainer state nor its manifest can be read."""
    for read in (read_trainer_state, read_manifest):
        try:
            recorded = read(directory)
        except CheckpointError:
            continue
        if recorded is not None:
            return recorded.get("run_id")
    return _UNKNOWN


def _ownership_conflict(final: Path, run_id) -> Optional[str]:
    if not final.exists():
        return None
    owner = _owner(final)
    if owner is _UNKNOWN or owner == run_id:
        return None  # this run's own save of the step (a resumed run), or a wreck nobody can claim
    return (
        f"{final}: belongs to run {owner!r}, not to this run ({run_id!r}); refusing to overwrite it: "
        f"use another checkpoint directory or remove it"
    )


# ---- failures -----------------------------------------------------------------------------------------------
def _collectively(action, final: Path, tmp: Path, needed: Optional[int]):
    """Run ``action`` on this rank and return its result. If it failed on any rank, rank 0 removes the
    temporary directory (``latest`` and the older checkpoints are not touched) and every rank raises: ENOSPC
    for a full disk, else its own error (or, where it succeeded, a RuntimeError saying another rank failed)."""
    from torch.distributed.checkpoint.api import CheckpointException

    failure, result = None, None
    try:
        with rank0_writes.deferring() as deferred:  # rank 0's own writes fail here, not in a collective
            result = action()
        if deferred:
            failure = deferred[0]
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        failure = err
    flag = all_reduce_host(torch.tensor([0 if failure is None else 1]), op=dist.ReduceOp.MAX)
    if not flag.item():
        return result
    disk_full = (failure is not None and _mentions_no_space(failure)) or _disk_nearly_full(final)
    dist.barrier()  # every rank has decided before the files it may have looked at go away
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if disk_full:
        raise errors.os_error(errno.ENOSPC, final, needed_bytes=needed) from failure
    if failure is not None:
        raise failure
    raise RuntimeError(f"saving {final} failed on another rank; {tmp} was removed, {LATEST} is unchanged")


def _mentions_no_space(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (causes, contexts, torch DCP's per-rank failures)."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current) for text in _NO_SPACE_TEXT):
            return True
        pending += [current.__cause__, current.__context__]
        pending += [pair[0] for pair in getattr(current, "failures", {}).values() if isinstance(pair, tuple)]
    return False


def _disk_nearly_full(path: Path) -> bool:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < FULL_DISK_MARGIN
    except OSError:
        return False


def _size_of_newest(root: Path) -> Optional[int]:
    """Bytes of the newest complete checkpoint: what the next save will need, about."""
    complete = complete_checkpoints(root)
    if not complete:
        return None
    return sum(p.stat().st_size for p in complete[-1].rglob("*") if p.is_file())


# ---- pruning ------------------------------------------------------------------------------------------------
def _prune(root: Path, keep: int, run_id, protected=frozenset()) -> None:
    """Remove this run's checkpoints beyond the ``keep`` newest that verify (sizes only), oldest step first.
    Other runs' checkpoints, damaged ones newer than those kept, the ``protected`` ones and the one ``latest``
    names are never removed."""
    if keep <= 0:
        return
    protected = set(protected) | {root / _latest_name(root)}
    own = []
    for directory in complete_checkpoints(root):
        try:
            state = read_trainer_state(directory)
        except CheckpointError:
            continue  # unreadable: whose it is cannot be known
        if state.get("run_id") == run_id:
            own.append((state["step"], directory))
    kept = 0
    for _, directory in sorted(own, key=lambda entry: entry[0], reverse=True):
        if kept >= keep and directory not in protected:
            shutil.rmtree(directory, ignore_errors=True)
        elif _verifies(directory):
            kept += 1


def _latest_name(root: Path) -> str:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _verifies(directory: Path) -> bool:
    try:
        verify_checkpoint(directory, checksums=False)
    except CheckpointError:
        return False
    return True


def save_rng_state(path: Path) -> None:
    torch.save(rng_state(), path)


# ---- resuming -----------------------------------------------------------------------------------------------
def has_reshardable_optimizer(path: Path) -> bool:
    """Written with the layout-independent optimizer state (a distributed checkpoint), not per-rank ZeRO files
    (checkpoints of trainer format 1, which resume under their own layout only)."""
    return (Path(path) / "optimizer" / safe_load.DCP_METADATA).is_file()


def load_optimizer(model, engine, path: Path) -> None:
    """Collective: the optimizer state of checkpoint ``path`` into the engine, whatever layout wrote it (a
    format-1 checkpoint: this rank's ZeRO partition, same layout only)."""
    path = Path(path)
    if not has_reshardable_optimizer(path):
        load_zero_partition(engine, _rank_file(path, "optimizer"))
        return
    load_optimizer_state(model, engine, lambda template: safe_load.load_dist_checkpoint(template, path / "optimizer"))


def load_rng(path: Path) -> None:
    """This rank's RNG states as the same rank of the same layout saved them."""
    rng_file = _rank_file(Path(path), "rng")
    set_rng_state(load_weights_only(rng_file, str(rng_file)))
