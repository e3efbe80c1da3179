"""Checkpoint integrity: the manifest finds flipped, truncated and missing files, ``find_latest`` falls back to
the previous good checkpoint in one line, an explicitly named damaged checkpoint is refused, pruning keeps the
newest verified checkpoint and other runs' checkpoints, a save never overwrites another run's step, and a full
disk fails a save cleanly (ENOSPC, temporary removed, ``latest`` and older checkpoints intact).

In-process on a one-rank gloo group with a tiny model and a real DeepSpeed engine; one end-to-end test through
the training command (slow)."""

import errno
import hashlib
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from megatron_qsparse.errors import EXIT_DATA, EXIT_IO, CheckpointError, exit_code_and_message
from megatron_qsparse.model import preset
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import default_init, initialize_weights
from megatron_qsparse.parallel.state import single_process_model_parallel
from megatron_qsparse.training import checkpoint as ckpt
from megatron_qsparse.training.optimizer import build_engine, init_deepspeed_comm
from training.conftest import GROUP_ENV, metrics, one_rank_group, run_training, write_config
from training.reshard_cases import MODEL

RUN = "run-a"
Live = namedtuple("Live", "model engine cfg")


@pytest.fixture(scope="module")
def live():
    """A one-rank group, a tiny model and its DeepSpeed engine, for the whole module."""
    with one_rank_group(), single_process_model_parallel():
        init_deepspeed_comm()
        cfg = preset("tiny", MODEL)
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        initialize_weights(model, seed=11, init=default_init(0.05, cfg.num_layers))
        engine = build_engine(
            model,
            lr=1e-3,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
            clip_grad=1.0,
            zero_stage=1,
            micro_batch_size=2,
            num_microbatches=1,
        )
        yield Live(model, engine, cfg)


def trainer_state(live, run_id=RUN) -> dict:
    return {"run_id": run_id, "world_size": 1, "config": {"model": dict(live.cfg.to_dict(), preset="tiny")}}


def save(live, root: Path, step: int, run_id=RUN, keep: int = 0) -> Path:
    return ckpt.save_checkpoint(root, step, live.model, live.engine, trainer_state(live, run_id), keep=keep)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def pristine(live, tmp_path_factory):
    """Steps 2 and 4 of run-a (different weights), ``latest`` -> step 4; and the weights of step 2."""
    root = tmp_path_factory.mktemp("integrity") / "checkpoints"
    save(live, root, 2)
    at_step_2 = weights(live.model)
    with torch.no_grad():
        for parameter in live.model.parameters():
            parameter.add_(0.5)
    save(live, root, 4)
    return root, at_step_2


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(pristine[0], copy)
    return copy


# ---- damage ---------------------------------------------------------------------------------------------------
def flip_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # how, the file, what the one line must say about it
    "flipped-distcp": (flip_4k, "model/__0_0.distcp", "sha256"),
    "flipped-optimizer": (flip_4k, "optimizer/__0_0.distcp", "sha256"),
    "truncated-distcp": (truncate, "model/__0_1.distcp", "bytes"),
    "missing-metadata": (Path.unlink, "model/.metadata", "missing"),
    "missing-rng": (Path.unlink, "rng/rank_00000.pt", "missing"),
    "broken-trainer-state": (lambda p: p.write_text('{"step": 4, "con'), "trainer_state.json", "JSON"),
}


def damage(checkpoint: Path, kind: str) -> str:
    how, name, _ = DAMAGE[kind]
    how(checkpoint / name)
    return name


def stderr_lines(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---- the manifest ---------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_size_and_sha256(root):
    step = root / "step_0000004"
    manifest = json.loads((step / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [n for n in on_disk if n not in ("manifest.json", "trainer_state.json")]
    assert {"model/.metadata", "model/common.pt", "optimizer/.metadata", "rng/rank_00000.pt"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (step / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert (manifest["run_id"], manifest["step"]) == (RUN, 4)
    assert ckpt.verify_checkpoint(step)["step"] == 4


def test_checksums_catch_a_flip_that_sizes_alone_miss(root):
    step = root / "step_0000004"
    flip_4k(step / "model" / "__0_0.distcp")
    ckpt.verify_checkpoint(step, checksums=False)  # same size: only the checksum can tell
    with pytest.raises(CheckpointError, match=r"step_0000004/model/__0_0\.distcp: sha256 differs"):
        ckpt.verify_checkpoint(step)


# ---- falling back ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_find_latest_falls_back_to_the_previous_good_checkpoint_in_one_line(kind, root, capsys):
    newest, previous = root / "step_0000004", root / "step_0000002"
    assert (root / "latest").read_text().strip() == newest.name
    name = damage(newest, kind)
    capsys.readouterr()
    assert ckpt.find_latest(root) == previous
    lines = stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert f"checkpoint {newest} is damaged" in lines[0] and f"using {previous}" in lines[0]
    assert name in lines[0] and DAMAGE[kind][2] in lines[0], lines[0]
    assert newest.is_dir(), "a damaged checkpoint is left in place"


@pytest.mark.parametrize("kind", ["flipped-optimizer", "missing-metadata", "broken-trainer-state"])
def test_an_explicitly_named_damaged_checkpoint_is_refused_in_one_line(kind, root):
    name = damage(root / "step_0000004", kind)
    with pytest.raises(CheckpointError) as caught:
        ckpt.resolve_checkpoint(root / "step_0000004")
    message = str(caught.value)
    assert "\n" not in message and f"step_0000004/{name}" in message, message
    assert exit_code_and_message(caught.value)[0] == EXIT_DATA


def test_the_fallback_loads_the_previous_checkpoints_weights(live, root, pristine):
    flip_4k(root / "step_0000004" / "model" / "__0_1.distcp")
    found = ckpt.resolve_checkpoint(root)
    assert found == root / "step_0000002"
    ckpt.load_model(live.model, found)
    ckpt.load_optimizer(live.model, live.engine, found)
    ckpt.load_rng(found)
    loaded = weights(live.model)
    for key, value in pristine[1].items():
        assert torch.equal(loaded[key], value), key


def test_when_no_checkpoint_verifies_resuming_is_refused(root):
    damage(root / "step_0000004", "truncated-distcp")
    damage(root / "step_0000002", "broken-trainer-state")
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies \(newest step_0000004: model/__0_1\.distcp"):
        ckpt.find_latest(root)


def test_checkpoints_without_a_manifest_get_structure_and_size_checks(root):
    """Written before manifests existed: accepted, and truncated or missing files are still found."""
    for step in ("step_0000002", "step_0000004"):
        (root / step / "manifest.json").unlink()
    assert ckpt.find_latest(root) == root / "step_0000004"
    truncate(root / "step_0000004" / "model" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: \d+ bytes, \.metadata needs \d+ \(truncated\)"):
        ckpt.verify_checkpoint(root / "step_0000004")
    truncate(root / "step_0000002" / "optimizer" / "common.pt")
    with pytest.raises(CheckpointError, match=r"step_0000002/optimizer/common\.pt: not a readable torch archive"):
        ckpt.verify_checkpoint(root / "step_0000002")


def relabel(directory: Path, step: int, run_id: str) -> Path:
    """A copy of a checkpoint as if written at ``step`` by ``run_id`` (trainer_state is not in the manifest)."""
    target = directory.parent / ckpt.step_name(step)
    shutil.copytree(directory, target)
    state = json.loads((target / "trainer_state.json").read_text())
    (target / "trainer_state.json").write_text(json.dumps(dict(state, step=step, run_id=run_id)))
    return target


def test_steps_past_ten_million_order_by_number_not_name(live, root):
    old = relabel(root / "step_0000004", 9_999_999, RUN)
    new = relabel(root / "step_0000004", 10_000_000, RUN)
    (root / "latest").unlink()
    assert ckpt.find_latest(root) == new  # "step_10000000" < "step_9999999" as strings
    save(live, root, 10_000_001, keep=2)
    assert not old.exists() and new.is_dir() and (root / "step_10000001").is_dir()


# ---- pruning and ownership ------------------------------------------------------------------------------------
def test_pruning_keeps_the_new_checkpoint_when_resuming_below_a_damaged_one(live, root):
    """Resumed from step 2 because step 4 is damaged, the run saves step 3 with keep=1: step 3 stays (latest
    names it), the damaged step 4 is left in place, step 2 goes."""
    damage(root / "step_0000004", "truncated-distcp")
    saved = save(live, root, 3, keep=1)
    assert saved == root / "step_0000003" and saved.is_dir()
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert ckpt.verify_checkpoint(saved)["step"] == 3
    assert (root / "step_0000004").is_dir() and not (root / "step_0000002").exists()
    assert ckpt.find_latest(root) == saved


def test_pruning_removes_only_this_runs_checkpoints_oldest_first(live, root):
    other = relabel(root / "step_0000002", 1, "run-b")
    save(live, root, 6, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000001", "step_0000004", "step_0000006"]
    assert ckpt.verify_checkpoint(other)["run_id"] == "run-b"


def test_a_save_never_overwrites_another_runs_checkpoint(live, root):
    theirs = root / "step_0000004"
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"step_0000004: belongs to run 'run-a', not to this run \('run-b'\)"):
        save(live, root, 4, run_id="run-b")
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    assert not list(root.glob(".tmp-*")) and (root / "latest").read_text().strip() == "step_0000004"


def test_a_resumed_run_may_save_its_own_step_again(live, root):
    damage(root / "step_0000004", "flipped-distcp")
    save(live, root, 4)
    assert ckpt.verify_checkpoint(root / "step_0000004")["run_id"] == RUN
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


# ---- a full disk ----------------------------------------------------------------------------------------------
def _torch_full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")


def _errno_full_disk(*args, **kwargs):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as err:
        raise RuntimeError("basic_ios::clear: iostream error") from err


FULL_DISKS = {
    "torch-error-and-no-free-space": (_torch_full_disk, True),
    "enospc-in-the-chain": (_errno_full_disk, False),
}


@pytest.mark.parametrize("case", sorted(FULL_DISKS))
def test_a_full_disk_fails_the_save_cleanly(case, live, root, monkeypatch):
    writer, report_no_space = FULL_DISKS[case]
    monkeypatch.setattr(ckpt, "save_rng_state", writer)
    if report_no_space:
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(OSError) as caught:
        save(live, root, 6)
    err = caught.value
    assert err.errno == errno.ENOSPC and err.filename == str(root / "step_0000006")
    code, line = exit_code_and_message(err)
    assert code == EXIT_IO and "no space left on device" in line and "MiB needed" in line, line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert (root / "latest").read_text().strip() == "step_0000004"
    assert ckpt.verify_checkpoint(root / "step_0000004")["step"] == 4


def test_another_save_failure_is_not_reported_as_a_full_disk(live, root, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(ckpt, "save_rng_state", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        save(live, root, 6)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]


# ---- two ranks ------------------------------------------------------------------------------------------------
# The writes a save can lose, and the rank that loses it: this rank's RNG file, and the three files only rank 0
# writes between megatron-core's collectives (common.pt, DCP's .metadata, metadata.json).
RANK_WRITES = ("rng", "common", "dcp-metadata", "metadata-json")


def _failing_rank0_writes(failing: set):
    """Make each of megatron-core's rank-0 writes raise ENOSPC while its name is in ``failing``."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def failing_when(name, write):
        def maybe_failing(*args, **kwargs):
            if name in failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args, **kwargs)

        return maybe_failing

    for owner, attr, name in ((TorchCommonSaveStrategy, "save_common", "common"),
                              (FileSystemWriterAsync, "finish", "dcp-metadata"),
                              (serialization, "save_config", "metadata-json")):  # fmt: skip
        setattr(owner, attr, failing_when(name, getattr(owner, attr)))


def save_on_two_ranks(rank, world_size, root: str) -> dict:
    """Step 2 saved normally; then step 4 once per entry of RANK_WRITES, with that write failing (the RNG file on
    rank 1, the others on rank 0, where alone they are written): what each rank raised, and the directory after."""
    from megatron_qsparse.parallel.layout import ParallelLayout
    from megatron_qsparse.parallel.state import destroy_model_parallel, initialize_model_parallel

    failing = set()
    if rank == 0:
        _failing_rank0_writes(failing)  # before the first save, as a real disk would be
    initialize_model_parallel(ParallelLayout())
    try:
        init_deepspeed_comm()
        cfg = preset("tiny", MODEL)
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        initialize_weights(model, seed=11, init=default_init(0.05, cfg.num_layers))
        engine = build_engine(
            model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, clip_grad=1.0, zero_stage=1,
            micro_batch_size=2, num_microbatches=1,
        )  # fmt: skip
        live = Live(model, engine, cfg)
        save(live, Path(root), 2)
        real_rng_writer, outcomes = ckpt.save_rng_state, {}
        for write in RANK_WRITES:
            if write == "rng" and rank == 1:
                ckpt.save_rng_state = _torch_full_disk  # this process only
            elif write != "rng" and rank == 0:
                failing.add(write)
            try:
                save(live, Path(root), 4)
                outcomes[write] = "saved"
            except Exception as err:
                outcomes[write] = f"{type(err).__name__}: {err}"
            failing.clear()
            ckpt.save_rng_state = real_rng_writer
            outcomes[write + " left"] = sorted(p.name for p in Path(root).iterdir())
        return outcomes
    finally:
        destroy_model_parallel()


@pytest.mark.slow
def test_two_ranks_share_the_manifest_and_fail_a_save_together(tmp_path):
    """Whichever rank loses whichever write, both ranks fail the save (no rank left waiting in a collective),
    the temporary directory goes and ``latest`` stays."""
    from distributed.launch import run_workers

    root = tmp_path / "checkpoints"
    raised = run_workers(2, save_on_two_ranks, str(root), timeout=300)
    assert raised[0]["rng"].startswith("RuntimeError: saving") and "failed on another rank" in raised[0]["rng"]
    assert raised[1]["rng"].startswith("RuntimeError: [enforce fail"), raised
    for write in RANK_WRITES[1:]:  # rank 0 lost it: a full disk there, "another rank" on rank 1
        assert raised[0][write].startswith(f"OSError: [Errno {errno.ENOSPC}]"), (write, raised)
        assert "failed on another rank" in raised[1][write], (write, raised)
    for outcome in raised:
        for write in RANK_WRITES:
            assert outcome[write + " left"] == ["latest", "step_0000002"], (write, outcome)
    manifest = json.loads((root / "step_0000002" / "manifest.json").read_text())
    assert {"optimizer/.metadata", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(manifest["files"])
    assert ckpt.verify_checkpoint(root / "step_0000002")["step"] == 2
    assert (root / "latest").read_text().strip() == "step_0000002"


# ---- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_resumes_from_the_previous_good_checkpoint(corpus, tmp_path, monkeypatch):
    for key in GROUP_ENV:  # the in-process group's address must not leak into the training command
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "config.yaml", corpus, run, train={"steps": 8}, checkpoint={"interval": 4, "keep": 3}
    )
    first = run_training(config)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run / "checkpoints"
    flip_4k(checkpoints / "step_0000008" / "model" / "__0_0.distcp")
    config = write_config(
        tmp_path / "config.yaml", corpus, run, train={"steps": 10}, checkpoint={"interval": 4, "keep": 3}
    )
    resumed = run_training(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step_0000004'} at step 4" in resumed.stdout
    damaged = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "step_0000008" in damaged[0] and "model/__0_0.distcp" in damaged[0], damaged
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))  # steps 5-8 re-run, not doubled
    assert ckpt.verify_checkpoint(checkpoints / "step_0000008")["step"] == 8  # saved again, whole this time
    assert ckpt.find_latest(checkpoints) == checkpoints / "step_0000010"
