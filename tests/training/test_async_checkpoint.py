"""Background checkpoints (``checkpoint.async_save``) on two processes: written while training goes on, complete
and verified, resumed bit-exactly; and one that fails on a full disk (a small tmpfs) never becomes ``latest``, said in
one line while the run trains on."""

import shutil
import subprocess
import sys

import pytest

from megatron_qsparse.model.checkpoint import LATEST, step_name, verify_checkpoint
from training.conftest import REPO, environment, losses, metrics, run_training, write_config

pytestmark = pytest.mark.slow
STEPS = 6


def configs(corpus, tmp_path, checkpoint_dir=None):
    extra = {"dir": str(checkpoint_dir)} if checkpoint_dir else {}
    return {
        mode: write_config(
            tmp_path / f"{mode}.yaml",
            corpus,
            tmp_path / mode,
            train={"steps": STEPS},
            checkpoint={"interval": 2, "keep": 0, "async_save": mode == "background", **extra},
        )
        for mode in ("blocking", "background")
    }


def test_background_saves_are_complete_and_resume_exactly(corpus, tmp_path):
    config = configs(corpus, tmp_path)
    runs = {mode: run_training(path, nproc=2) for mode, path in config.items()}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = runs["background"].stdout
    for step in (2, 4):
        assert f"checkpoint {step_name(step)}: writing in the background" in out
        assert f"saved checkpoint {tmp_path / 'background' / 'checkpoints' / step_name(step)} (in the background" in out
    assert losses(tmp_path / "background") == losses(tmp_path / "blocking")  # training did not notice
    checkpoints = tmp_path / "background" / "checkpoints"
    for step in (2, 4, 6):
        assert verify_checkpoint(checkpoints / step_name(step))["step"] == step
    # The background step 4 holds the state of step 4, not a later one: resuming from it is bit-exact.
    shutil.rmtree(checkpoints / step_name(6))
    (checkpoints / LATEST).write_text(step_name(4) + "\n")
    resumed = run_training(config["background"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(tmp_path / "background") == losses(tmp_path / "blocking")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.5 checkpoints (measured on a blocking run of the same model), or a skip without mount."""

    def mount(size_bytes: int):
        disk = tmp_path / "disk"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(disk)])
        if done.returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(disk)
        return disk

    mounted = []
    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)])


def test_a_background_save_on_a_full_disk_never_becomes_latest(corpus, tmp_path, small_disk):
    probe = write_config(tmp_path / "probe.yaml", corpus, tmp_path / "probe", train={"steps": 2})
    assert run_training(probe).returncode == 0
    size = sum(f.stat().st_size for f in (tmp_path / "probe" / "checkpoints" / step_name(2)).rglob("*") if f.is_file())
    disk = small_disk(int(size * 1.5))
    config = configs(corpus, tmp_path, disk / "checkpoints")["background"]
    launcher = [sys.executable, str(REPO / "pretrain_scripts" / "pretrain_qsparse.py"), "--nproc-per-node", "2"]
    proc = subprocess.run(  # our launcher, which passes the ranks' exit code on (torchrun's is 1)
        launcher + ["--config", str(config)], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout
    assert f"checkpoint {step_name(4)} failed in the background" in out, out[-3000:]
    assert f"latest is still {step_name(2)}; training goes on" in out
    assert [r["step"] for r in metrics(tmp_path / "background")] == list(range(1, STEPS + 1))
    assert proc.returncode == 74, proc.stderr[-3000:]  # the final save (blocking) then finds the disk full
    assert f"error: {disk / 'checkpoints' / step_name(6)}: no space left on device" in proc.stderr, proc.stderr[-3000:]
    assert (disk / "checkpoints" / LATEST).read_text().strip() == step_name(2)
    assert verify_checkpoint(disk / "checkpoints" / step_name(2))["step"] == 2
    assert not list((disk / "checkpoints").glob(".tmp-*"))
