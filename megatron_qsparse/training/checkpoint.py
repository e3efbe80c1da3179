"""Writing and resuming checkpoints: the model as a megatron-core distributed checkpoint (loadable under any
TP/PP layout), each rank's DeepSpeed ZeRO optimizer partition, each rank's RNG states, and the trainer state
(step, config, layout). The format and its reading live in ``model/checkpoint.py``.

Everything is written under ``<root>/.tmp-step_0000100`` and renamed when all ranks are done, so a killed save
never leaves a directory that ``find_latest`` would pick. Our own files load with ``weights_only=True``.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_qsparse import atomic
from megatron_qsparse.model.checkpoint import (  # noqa: F401  (the reading side, re-exported for the trainer)
    LATEST,
    STATE_FILE,
    complete_checkpoints,
    find_latest,
    load_model,
    read_model_config,
    read_trainer_state,
    resolve_checkpoint,
    step_name,
)
from megatron_qsparse.training.optimizer import load_zero_partition, save_zero_partition


def _rank_file(directory: Path, kind: str) -> Path:
    return directory / kind / f"rank_{dist.get_rank():05d}.pt"


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


def save_checkpoint(root: Path, step: int, model, engine, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn save of the same step
        for sub in ("model", "optimizer", "rng"):
            (tmp / sub).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    save_zero_partition(engine, _rank_file(tmp, "optimizer"))
    torch.save(rng_state(), _rank_file(tmp, "rng"))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(dict(trainer_state, step=step), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    atomic.write_text(root / LATEST, name + "\n")


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_optimizer_and_rng(engine, path: Path) -> None:
    """This rank's ZeRO partition and RNG states; only valid for the layout and world size that saved them."""
    load_zero_partition(engine, _rank_file(Path(path), "optimizer"))
    set_rng_state(torch.load(_rank_file(Path(path), "rng"), weights_only=True))
