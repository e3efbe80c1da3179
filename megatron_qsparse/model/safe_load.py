"""Loading a checkpoint's model directory without running code planted in it.

A megatron-core ``torch_dist`` checkpoint (``<step>/model/``) holds files that plain pickle would execute:

* ``.metadata``, torch distributed checkpoint's index, which torch reads with ``pickle.load``;
* byte items inside the ``__*_*.distcp`` files (megatron's ``_extra_state`` entries), which torch's default
  load planner reads with ``torch.load(weights_only=False)``;
* ``common.pt`` (and any other ``.pt`` megatron-core keeps there), read with ``torch.load``.

:func:`load_dist_checkpoint` first checks all of them (:func:`check_model_dir`): ``.metadata`` through an
unpickler that only builds torch DCP's own metadata classes and the torch types they hold, every byte item and
``.pt`` with ``torch.load(weights_only=True)``, and the bounds of every storage entry against its file. It then
loads through megatron-core with strategies that read the same way (:class:`SafeTorchDistLoadStrategy`,
:class:`SafeCommonLoadStrategy`), so a file swapped between the check and the load is refused too. A refusal
is a :class:`~megatron_qsparse.errors.CheckpointError`: one line naming the file (and item).
"""

import contextlib
import importlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_qsparse.errors import CheckpointError

DCP_METADATA = ".metadata"
MCORE_CONFIG = "metadata.json"

# (module, name) that a torch DCP .metadata may reference (torch 2.13's metadata.py, filesystem.py and
# planner.py dataclasses, which megatron-core also stores as ``all_local_plans``). Dataclasses and enums only
# set attributes when unpickled.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},  # maps a layout's name to the torch.layout
    "torch": {"Size"},
    "builtins": {"set", "frozenset"},
    "collections": {"OrderedDict"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32, torch.strided, ...


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the allowed classes; any other global (os.system, eval, ...) is refused before it is
    looked up, so nothing outside the allowlist can be called."""

    def find_class(self, module, name):
        if name in _DCP_CLASSES.get(module, ()):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def read_dcp_metadata(path: Path):
    """torch DCP's ``.metadata`` (a ``Metadata``), read with the allowlist; CheckpointError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing (the distributed checkpoint's index)") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused, not plain checkpoint metadata ({_first_line(err)})") from err
    except Exception as err:  # a truncated or scrambled pickle raises any of EOFError, ValueError, KeyError, ...
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({_first_line(err)}); damaged?") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not a torch distributed checkpoint index ({type(metadata).__name__})")
    return metadata


def load_weights_only(source, where: str):
    """``torch.load(source, weights_only=True)``; CheckpointError naming ``where`` when it holds anything else
    or cannot be read."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{where}: refused, holds objects weights_only loading does not allow ({_why(err)})"
        ) from err
    except Exception as err:  # truncated zip, bad magic, ... (torch raises RuntimeError, EOFError, ValueError)
        raise CheckpointError(f"{where}: unreadable ({_first_line(err)}); damaged?") from err


def storage_extents(metadata) -> Dict[str, int]:
    """``{relative .distcp path: bytes its entries need}`` from a DCP index; refuses paths leaving the dir."""
    needed: Dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = str(info.relative_path)
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index.fqn}: storage path {name!r} leaves the checkpoint directory")
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    return needed


def check_extents(model_dir: Path, metadata) -> None:
    """Every file the index points into exists and is long enough (a truncated ``.distcp`` is found here)."""
    for name, needed in sorted(storage_extents(metadata).items()):
        path = Path(model_dir) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named in {DCP_METADATA})")
        size = path.stat().st_size
        if size < needed:
            raise CheckpointError(f"{path}: {size} bytes, {DCP_METADATA} needs {needed} (truncated)")


def check_mcore_config(model_dir: Path) -> None:
    path = Path(model_dir) / MCORE_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing (not a megatron-core distributed checkpoint)") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({_first_line(err)}); damaged?") from err
    backends = (config.get("sharded_backend"), config.get("common_backend")) if isinstance(config, dict) else None
    if backends != ("torch_dist", "torch"):
        raise CheckpointError(f"{path}: backends {backends} are not torch_dist/torch, the only ones loaded here")


def check_model_dir(model_dir: Path):
    """Everything :func:`load_dist_checkpoint` will read, read safely once; returns the DCP index."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: missing (the model's distributed checkpoint directory)")
    check_mcore_config(model_dir)
    metadata = read_dcp_metadata(model_dir / DCP_METADATA)
    check_extents(model_dir, metadata)
    _check_byte_items(model_dir, metadata)
    for path in sorted(model_dir.glob("*.pt")):
        load_weights_only(path, str(path))
    return metadata


def _check_byte_items(model_dir: Path, metadata) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors: torch's reader loads them with weights_only=True
        where = f"{model_dir / info.relative_path} (item {index.fqn})"
        if info.transform_descriptors:
            raise CheckpointError(f"{where}: stored with transforms {list(info.transform_descriptors)}, not loaded")
        with open(model_dir / info.relative_path, "rb") as stream:
            stream.seek(info.offset)
            load_weights_only(io.BytesIO(stream.read(info.length)), where)


# ---- the load itself --------------------------------------------------------------------------------------------
def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """torch DCP's reader with ``.metadata`` read through the allowlist and byte items through
        ``weights_only``; the first refusal is kept in ``refusal`` (torch wraps errors raised here)."""

        def __init__(self, path):
            super().__init__(path)
            self.refusal: Optional[CheckpointError] = None
            self._cached = None

        def read_metadata(self, *args, **kwargs):
            rank_local = kwargs.get("rank") is not None
            if self._cached is not None and not rank_local:
                return self._cached
            try:
                metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            except CheckpointError as err:
                self.refusal = self.refusal or err
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if not rank_local:
                self._cached = metadata
            return metadata

        def read_data(self, plan, planner):
            return super().read_data(plan, _WeightsOnlyBytes(planner, self))

    return SafeFileSystemReader


class _WeightsOnlyBytes:
    """A load planner whose ``load_bytes`` gets only what ``torch.load(weights_only=True)`` accepted, saved
    again by torch (the planner itself would ``torch.load`` the stored bytes with ``weights_only=False``)."""

    def __init__(self, planner, reader):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        where = f"{os.path.join(str(self._reader.path), info.relative_path)} (item {read_item.storage_index.fqn})"
        try:
            loaded = load_weights_only(value, where)
        except CheckpointError as err:
            self._reader.refusal = self._reader.refusal or err
            raise
        clean = io.BytesIO()
        torch.save(loaded, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


def _strategies():
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    reader_class = _reader_class()

    class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """megatron-core's torch_dist loading, with every DCP reader it makes a safe one."""

        def __init__(self):
            super().__init__()
            self.readers = []

        @contextlib.contextmanager
        def _safe_readers(self):
            # megatron-core builds its readers through this module function; there is no parameter for it.
            original = mcore_torch._get_filesystem_reader
            mcore_torch._get_filesystem_reader = self._make_reader
            try:
                yield
            finally:
                mcore_torch._get_filesystem_reader = original

        def _make_reader(self, checkpoint_dir, cache_metadata=False):
            reader = reader_class(checkpoint_dir)
            self.readers.append(reader)
            return reader

        def refusal(self) -> Optional[CheckpointError]:
            return next((r.refusal for r in self.readers if r.refusal is not None), None)

        def load(self, sharded_state_dict, checkpoint_dir):
            with self._safe_readers():
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            with self._safe_readers():
                return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            with self._safe_readers():
                return super().load_sharded_metadata(checkpoint_dir)

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        """``common.pt`` with ``weights_only=True`` whatever torch's default or environment says."""

        def load_common(self, checkpoint_dir):
            path = os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)
            return load_weights_only(path, path)

    return SafeTorchDistLoadStrategy(), SafeCommonLoadStrategy()


def load_dist_checkpoint(sharded_state_dict, model_dir: Path):
    """megatron-core ``dist_checkpointing.load`` of ``model_dir``, reading nothing that could run code."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    sharded, common = _strategies()
    try:
        return dist_checkpointing.load(
            sharded_state_dict, str(model_dir), sharded_strategy=sharded, common_strategy=common
        )
    except (CheckpointException, Exception) as err:  # torch's CheckpointException is a BaseException
        refusal = sharded.refusal()
        if refusal is not None:
            raise refusal from err
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _why(err: BaseException) -> str:
    """The informative line of torch's long weights_only refusal (e.g. ``Unsupported global: GLOBAL
    posix.system``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line:
            return line.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(err).__name__
