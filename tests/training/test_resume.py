"""Faults: SIGKILL after a checkpoint and resume reproduces the uninterrupted run; SIGTERM writes a checkpoint
and exits 75; a torn checkpoint directory is never picked."""

import json
import signal

import pytest

from megatron_qsparse.training.checkpoint import find_latest, read_trainer_state
from training.conftest import kill_tree, losses, metrics, run_training, start, wait_for, write_config

pytestmark = pytest.mark.slow
STEPS = 40
SETTINGS = dict(train={"steps": STEPS}, checkpoint={"interval": 4, "keep": 3})


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    proc = run_training(write_config(root / "config.yaml", corpus, root / "run", **SETTINGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_sigkill_then_resume_reproduces_uninterrupted_losses(corpus, reference, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", **SETTINGS)
    proc = start(config)
    wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_0000008" / "trainer_state.json").exists(), proc)
    kill_tree(proc)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = len(metrics(tmp_path / "run"))
    assert interrupted_at < STEPS, "the run finished before it was killed"

    resumed = run_training(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # re-run steps replaced, none doubled
    assert losses(tmp_path / "run") == losses(reference)  # bit-exact: same data order, RNG, optimizer state


def test_sigterm_writes_a_loadable_checkpoint_and_exits_75(corpus, reference, tmp_path):
    config = write_config(
        tmp_path / "config.yaml", corpus, tmp_path / "run", train={"steps": STEPS}, checkpoint={"interval": 0}
    )
    proc = start(config)
    wait_for(
        lambda: (
            (tmp_path / "run" / "metrics.jsonl").exists()
            and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 3
        ),
        proc,
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    latest = find_latest(tmp_path / "run" / "checkpoints")
    stopped = read_trainer_state(latest)["step"]
    assert 3 <= stopped < STEPS and f"stopping on signal {int(signal.SIGTERM)}" in out

    resumed = run_training(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference)


def test_torn_checkpoints_are_never_latest(tmp_path):
    root = tmp_path / "checkpoints"

    def complete(step):
        d = root / f"step_{step:07d}"
        (d / "model").mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
        return d

    assert find_latest(root, verify=False) is None
    good = complete(4)
    (root / ".tmp-step_0000008" / "model").mkdir(parents=True)  # killed while saving
    (root / "step_0000012" / "model").mkdir(parents=True)  # no trainer_state.json: incomplete
    assert find_latest(root, verify=False) == good
    (root / "latest").write_text("step_0000012\n")  # pointer to an incomplete directory
    assert find_latest(root, verify=False) == good
    newer = complete(16)
    (root / "latest").write_text("step_0000004\n")  # the pointer wins when it names a complete checkpoint
    assert find_latest(root, verify=False) == good
    (root / "latest").unlink()
    assert find_latest(root, verify=False) == newer
