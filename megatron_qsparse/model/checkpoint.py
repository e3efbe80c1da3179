"""Reading our checkpoints: the on-disk format's names, checking a checkpoint is whole, finding the newest one
that is, its trainer state and model config, and loading its weights into a model under any TP/PP/EP layout.

Below both training/ (which writes checkpoints, with the optimizer and RNG states) and hf/ (which exports them),
so that neither imports the other. Layout on disk::

    <root>/latest                           name of the newest verified checkpoint (replaced atomically)
    <root>/step_0000100/model/              megatron-core dist_checkpointing (torch_dist)
    <root>/step_0000100/optimizer/          the optimizer state, dist_checkpointing too (any layout; format 1
                                            held optimizer/rank_00003.pt, ZeRO partitions for its own layout)
    <root>/step_0000100/rng/rank_00003.pt
    <root>/step_0000100/manifest.json       size and sha256 of every file above (model/manifest.py)
    <root>/step_0000100/trainer_state.json  written last, before the rename: marks the directory complete

Integrity: :func:`verify_checkpoint` checks ``trainer_state.json`` is a JSON object with a step, every file the
manifest lists has its size and sha256, and the structure (the DCP index reads, every ``.distcp`` is as long as
the index needs, every ``.pt`` is a readable archive, a rank file for each rank). Checkpoints written before
manifests existed have none: they get the structure checks only, so a flipped byte inside a file goes unseen.
:func:`find_latest` returns the newest checkpoint that verifies; one that does not is reported in one line on
stderr, left in place and never used. :func:`resolve_checkpoint` on a checkpoint named explicitly raises.

Safety: :func:`load_model` reads the model through ``model/safe_load.py``, which refuses (``CheckpointError``,
one line naming the file) a ``.metadata`` that is not plain DCP metadata and any byte item or ``.pt`` that
``torch.load(weights_only=True)`` would not accept, so a planted pickle never runs.
"""

import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional

from megatron_qsparse.errors import CheckpointError
from megatron_qsparse.model import safe_load
from megatron_qsparse.model.config import QSparseConfig
from megatron_qsparse.model.manifest import MANIFEST, read_manifest, verify_files  # noqa: F401  (re-exported)

STATE_FILE = "trainer_state.json"
LATEST = "latest"
RANK_KINDS = ("optimizer", "rng")
_STEP_DIR = re.compile(r"step_(\d+)")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> Optional[int]:
    """The step a ``step_*`` directory's name says, or None for another name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    """The save finished (``trainer_state.json`` is written last); says nothing about the files' bytes."""
    return (path / STATE_FILE).is_file() and (path / "model").is_dir()


def complete_checkpoints(root: Path) -> list:
    """The complete ``step_*`` directories under ``root``, oldest first (by step number, not name: step 10**7
    sorts after step 9999999)."""
    found = [p for p in Path(root).glob("step_*") if step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint; CheckpointError when missing, not JSON or without a step."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{file}: missing (the save did not finish)") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({_first_line(err)}); damaged?") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file}: not a trainer state (no integer 'step')")
    return state


def verify_checkpoint(path: Path, checksums: bool = True) -> dict:
    """Check a checkpoint is whole and return its trainer state; CheckpointError naming the first bad file.
    ``checksums=False`` checks sizes only (no file is read in full). Checkpoints without ``manifest.json``
    (written before manifests existed) get the structure and size checks only. Files no manifest lists are
    ignored."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    state = read_trainer_state(path)
    manifest = read_manifest(path)
    if manifest is not None:
        verify_files(path, manifest, checksums)
    _check_structure(path, state)
    return state


def _check_structure(path: Path, state: dict) -> None:
    _check_dist_dir(path / "model")
    world_size = state.get("world_size")
    for kind in RANK_KINDS:
        if not (path / kind).is_dir():
            continue  # a weights-only checkpoint (an import, a test fixture) has no optimizer or RNG states
        if (path / kind / safe_load.DCP_METADATA).is_file():
            _check_dist_dir(path / kind)  # the layout-independent optimizer state
            continue
        ranks = range(world_size) if isinstance(world_size, int) else ()
        for name in sorted({rank_file_name(r) for r in ranks} | {p.name for p in (path / kind).glob("*.pt")}):
            _check_archive(path / kind / name)


def _check_dist_dir(directory: Path) -> None:
    """A megatron-core distributed checkpoint: its config, its index against its files, its archives."""
    safe_load.check_mcore_config(directory)
    safe_load.check_extents(directory, safe_load.read_dcp_metadata(directory / safe_load.DCP_METADATA))
    for archive in sorted(directory.glob("*.pt")):
        _check_archive(archive)


def _check_archive(path: Path) -> None:
    """A ``torch.save`` file is a zip archive whose directory sits at the end: a truncated one has none."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch archive ({_first_line(err)}); truncated?") from err


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _pointed(root: Path) -> Optional[Path]:
    """The directory ``latest`` names, when it names a ``step_*`` directory of ``root``."""
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if step_of(Path(name)) is not None and Path(name).name == name else None


def find_latest(root: Path, verify: bool = True, warn: Callable[[str], None] = _warn) -> Optional[Path]:
    """The checkpoint ``latest`` names if it is complete, else the newest complete ``step_*`` directory; with
    ``verify``, the first of those (in that order) that :func:`verify_checkpoint` accepts. Each damaged one
    skipped is reported through ``warn`` in one line and left in place. None when there is no complete
    checkpoint; CheckpointError when there are some but none verifies (resuming would silently start over)."""
    root = Path(root)
    pointed = _pointed(root)
    candidates = [p for p in complete_checkpoints(root)[::-1] if p != pointed]
    if pointed is not None and is_complete(pointed):
        candidates.insert(0, pointed)
    if not verify:
        return candidates[0] if candidates else None
    damaged = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            damaged.append((candidate, _relative_reason(err, candidate)))
            continue
        for bad, reason in damaged:
            warn(f"checkpoint {bad} is damaged ({reason}); using {candidate}")
        return candidate
    if damaged:
        bad, reason = damaged[0]
        raise CheckpointError(
            f"{root}: no checkpoint verifies (newest {bad.name}: {reason}); remove the damaged checkpoints or "
            f"start over with checkpoint.resume=false"
        )
    return None


def resolve_checkpoint(path: Path, verify: bool = True) -> Path:
    """A checkpoint directory (verified: CheckpointError if damaged), or a root holding ``latest`` (the newest
    checkpoint that verifies, see :func:`find_latest`)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        if verify:
            verify_checkpoint(path)
        return path
    found = find_latest(path, verify=verify)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no complete checkpoint (expected {STATE_FILE} and model/ inside, or a '{LATEST}' pointer)"
        )
    return found


def read_model_config(path: Path) -> QSparseConfig:
    """The model configuration a checkpoint was written with."""
    saved = dict(read_trainer_state(path)["config"]["model"])
    saved.pop("preset", None)
    return QSparseConfig.from_dict(saved)


def load_model(model, path: Path) -> None:
    """Load weights into this rank's model stage, whatever TP/PP layout wrote them. Nothing in the checkpoint
    can run code (model/safe_load.py); a refused or unreadable file is a CheckpointError naming it."""
    state = safe_load.load_dist_checkpoint(model.sharded_state_dict(), Path(path) / "model")
    model.load_state_dict(state)


def _relative_reason(err: CheckpointError, checkpoint: Path) -> str:
    return str(err).replace(f"{checkpoint}/", "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
