"""``manifest.json``: the size and sha256 of every file of a checkpoint, so that a truncated, overwritten or
bit-flipped file is found before its bytes reach the model or the optimizer.

The save writes it inside the temporary directory once every rank's files are on disk, just before
``trainer_state.json`` and the rename; ``trainer_state.json`` and the manifest itself are not listed (the first
is checked as JSON, the second is what the check reads). Format::

    {"format": 1, "algorithm": "sha256", "run_id": "...", "step": 100,
     "files": {"model/.metadata": {"size": 8464, "sha256": "..."}, "optimizer/rank_00000.pt": {...}, ...}}

Hashing can be shared by the ranks of a save (:func:`hash_files` on a slice of :func:`listed_files`), since
every rank sees the checkpoint directory on the shared file system.
"""

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from megatron_qsparse import atomic
from megatron_qsparse.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1
UNLISTED = ("trainer_state.json", MANIFEST)  # written after (or as) the manifest
_CHUNK = 4 * 2**20


def listed_files(directory: Path) -> List[str]:
    """The paths (relative, ``/``-separated, sorted) a manifest of ``directory`` lists."""
    directory = Path(directory)
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in names if name not in UNLISTED)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path, names: Iterable[str]) -> Dict[str, dict]:
    """``{name: {"size", "sha256"}}`` for files of ``directory``."""
    directory = Path(directory)
    return {name: {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)} for name in names}


def write_manifest(
    directory: Path, files: Optional[Dict[str, dict]] = None, run_id: Optional[str] = None, step=None
) -> dict:
    """Write ``directory/manifest.json`` (hashing every file unless ``files`` were hashed already)."""
    directory = Path(directory)
    files = hash_files(directory, listed_files(directory)) if files is None else files
    manifest = {
        "format": FORMAT,
        "algorithm": "sha256",
        "run_id": run_id,
        "step": step,
        "files": dict(sorted(files.items())),
    }
    atomic.write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> Optional[dict]:
    """The manifest of a checkpoint, or None for one written before manifests existed."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({_reason(err)})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' table)")
    if manifest.get("algorithm", "sha256") != "sha256":
        raise CheckpointError(f"{path}: unknown checksum algorithm {manifest.get('algorithm')!r}")
    return manifest


def verify_files(directory: Path, manifest: dict, checksums: bool = True) -> None:
    """Every listed file exists with its size (and, with ``checksums``, its sha256); CheckpointError naming the
    first that does not. Files the manifest does not list are ignored."""
    directory = Path(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(
                f"{path}: {size} bytes, {MANIFEST} says {expected.get('size')} (truncated or overwritten)"
            )
        if checksums and sha256_of(path) != expected.get("sha256"):
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST} (corrupted)")


def _reason(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
