"""Loading an untrusted checkpoint runs none of its code: a pickle planted in ``model/.metadata`` (torch DCP's
index), in a byte item of a ``.distcp`` file or in megatron-core's ``common.pt`` is refused with one line naming
the file, on resume (``load_model``) and on export (``hf.convert``), and the payload never runs."""

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_qsparse.errors import EXIT_DATA, CheckpointError, exit_code_and_message
from megatron_qsparse.model import preset, safe_load
from megatron_qsparse.model.checkpoint import STATE_FILE, load_model
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import default_init, initialize_weights
from megatron_qsparse.parallel.state import single_process_model_parallel
from training.conftest import one_rank_group
from training.reshard_cases import MODEL


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process for the module (single_process_model_parallel reuses it)."""
    with one_rank_group():
        yield


def tiny_model(seed: int):
    cfg = preset("tiny", MODEL)
    model = build_gpt_model(cfg, cfg.to_transformer_config())
    initialize_weights(model, seed=seed, init=default_init(0.05, cfg.num_layers))
    return cfg, model


@pytest.fixture(scope="module")
def pristine(process_group, tmp_path_factory):
    """A clean weights-only checkpoint (model/ + trainer_state.json, as convert_from_hf writes) and its weights."""
    from megatron.core import dist_checkpointing

    directory = tmp_path_factory.mktemp("safety") / "step_0000000"
    with single_process_model_parallel():
        cfg, model = tiny_model(seed=3)
        (directory / "model").mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(directory / "model"))
        weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state = {"step": 0, "world_size": 1, "config": {"model": dict(cfg.to_dict(), preset="tiny")}}
    (directory / STATE_FILE).write_text(json.dumps(state))
    return directory, weights


@pytest.fixture
def checkpoint(pristine, tmp_path):
    copy = tmp_path / "ckpt" / pristine[0].name
    shutil.copytree(pristine[0], copy)
    return copy


class Payload:
    """Unpickling this runs ``touch <marker>``: the code an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def read_index(model_dir: Path):
    with open(model_dir / ".metadata", "rb") as stream:
        return pickle.load(stream)  # our own clean file, written by the fixture


def write_index(model_dir: Path, metadata) -> None:
    with open(model_dir / ".metadata", "wb") as stream:
        pickle.dump(metadata, stream)


def plant_in_index(model_dir: Path, marker: Path, nested: bool) -> str:
    if nested:  # inside a genuine index, where only a full walk of the pickle finds it
        metadata = read_index(model_dir)
        metadata.planner_data = {"extra": Payload(marker)}
        write_index(model_dir, metadata)
    else:
        (model_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return ".metadata"


def plant_in_byte_item(model_dir: Path, marker: Path) -> str:
    """Append a torch.save payload to a .distcp file and point one of megatron's _extra_state byte items at it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_index(model_dir)
    index = next(
        i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    target = model_dir / metadata.storage_data[index].relative_path
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    offset = target.stat().st_size
    with open(target, "ab") as stream:
        stream.write(buffer.getvalue())
    metadata.storage_data[index] = _StorageInfo(target.name, offset, len(buffer.getvalue()))
    write_index(model_dir, metadata)
    return target.name


def plant_in_common(model_dir: Path, marker: Path) -> str:
    torch.save(Payload(marker), model_dir / "common.pt")
    return "common.pt"


PLANTS = {
    "metadata": lambda d, m: plant_in_index(d, m, nested=False),
    "metadata-nested": lambda d, m: plant_in_index(d, m, nested=True),
    "byte-item": plant_in_byte_item,
    "common.pt": plant_in_common,
}


def assert_one_line_naming(err: CheckpointError, name: str) -> None:
    message = str(err)
    assert "\n" not in message and name in message, message
    assert exit_code_and_message(err)[0] == EXIT_DATA


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_planted_pickle_never_runs_on_load(where, checkpoint, tmp_path, monkeypatch):
    # Even where torch's default would be weights_only=False, megatron-core's common.pt must not run code.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    name = PLANTS[where](checkpoint / "model", marker)
    with single_process_model_parallel():
        _, model = tiny_model(seed=4)
        with pytest.raises(CheckpointError) as caught:
            load_model(model, checkpoint)
    assert not marker.exists(), "the planted pickle ran"
    assert_one_line_naming(caught.value, name)


@pytest.mark.parametrize("where", ["metadata-nested", "byte-item"])
def test_the_load_itself_refuses_without_the_pre_check(where, checkpoint, tmp_path, monkeypatch):
    """A file swapped after the check: megatron-core's reading goes through the safe reader too."""
    marker = tmp_path / "payload-ran"
    name = PLANTS[where](checkpoint / "model", marker)
    monkeypatch.setattr(safe_load, "check_model_dir", lambda model_dir: None)
    with single_process_model_parallel():
        _, model = tiny_model(seed=4)
        with pytest.raises(CheckpointError) as caught:
            load_model(model, checkpoint)
    assert not marker.exists(), "the planted pickle ran"
    assert_one_line_naming(caught.value, name)


@pytest.mark.parametrize("where", ["metadata", "byte-item"])
def test_export_refuses_a_planted_checkpoint(where, checkpoint, tmp_path):
    from megatron_qsparse.hf.convert import export_checkpoint

    marker = tmp_path / "payload-ran"
    name = PLANTS[where](checkpoint / "model", marker)
    with pytest.raises(CheckpointError) as caught:
        export_checkpoint(checkpoint.parent, tmp_path / "hf", log=lambda message: None)
    assert not marker.exists(), "the planted pickle ran"
    assert_one_line_naming(caught.value, name)
    assert not (tmp_path / "hf").exists()


def test_a_clean_checkpoint_loads_through_the_safe_reader(pristine, monkeypatch):
    directory, weights = pristine
    byte_items = []
    original = safe_load._WeightsOnlyBytes.load_bytes

    def counting(self, read_item, value):
        byte_items.append(read_item.storage_index.fqn)
        return original(self, read_item, value)

    monkeypatch.setattr(safe_load._WeightsOnlyBytes, "load_bytes", counting)
    with single_process_model_parallel():
        _, model = tiny_model(seed=4)  # other weights: the load must replace them
        load_model(model, directory)
        loaded = model.state_dict()
    assert byte_items and all("_extra_state" in fqn for fqn in byte_items)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
