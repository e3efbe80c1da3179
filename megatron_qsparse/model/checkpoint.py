"""Reading our checkpoints: the on-disk format's names, finding the newest complete one, its trainer state and
model config, and loading its weights into a model under any TP/PP/EP layout.

Below both training/ (which writes checkpoints, with the optimizer and RNG states) and hf/ (which exports them),
so that neither imports the other. Layout on disk::

    <root>/latest                           name of the newest complete checkpoint (replaced atomically)
    <root>/step_0000100/model/              megatron-core dist_checkpointing (torch_dist)
    <root>/step_0000100/optimizer/rank_00003.pt
    <root>/step_0000100/rng/rank_00003.pt
    <root>/step_0000100/trainer_state.json  written last, before the rename: marks the directory complete
"""

import json
from pathlib import Path
from typing import Optional

from megatron_qsparse.model.config import QSparseConfig

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "model").is_dir()


def complete_checkpoints(root: Path) -> list:
    """The complete ``step_*`` directories under ``root``, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if is_complete(p))


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if it is complete, else the newest complete ``step_*`` directory."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a root holding ``latest``."""
    path = Path(path)
    if is_complete(path):
        return path
    found = find_latest(path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no complete checkpoint (expected {STATE_FILE} and model/ inside, or a '{LATEST}' pointer)"
        )
    return found


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_model_config(path: Path) -> QSparseConfig:
    """The model configuration a checkpoint was written with."""
    saved = dict(read_trainer_state(path)["config"]["model"])
    saved.pop("preset", None)
    return QSparseConfig.from_dict(saved)


def load_model(model, path: Path) -> None:
    """Load weights into this rank's model stage, whatever TP/PP layout wrote them."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(path) / "model"))
    model.load_state_dict(state)
