"""One run owns its run directory: a second live run is refused naming the holder, a new run never starts over
another run's checkpoints (which stay byte for byte as they were), and a configuration error under several
processes is one line."""

import hashlib
import signal
import subprocess
import sys

import pytest

from training.conftest import (
    REPO,
    command,
    environment,
    kill_tree,
    metrics,
    run_training,
    start,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def digest(root) -> dict:
    """Every checkpoint file's sha256 (the lock file names its latest holder, so it is left out)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_second_run_in_a_live_run_directory_is_refused_naming_the_holder(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", train={"steps": 400})
    first = start(config)
    try:
        wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), first)
        second = run_training(config, timeout=120)
        assert second.returncode == 73, second.stderr[-2000:]
        line = second.stderr.strip()
        assert "\n" not in line and f"{tmp_path / 'run'} is in use by another run (pid {first.pid}" in line
        assert first.poll() is None  # the first run goes on
    finally:
        kill_tree(first)
        first.communicate(timeout=60)


def test_a_new_run_refuses_a_directory_holding_another_runs_checkpoints(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", train={"steps": 3})
    assert run_training(config).returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = digest(checkpoints)

    fresh = run_training(config, overrides=["checkpoint.resume=false"])
    assert fresh.returncode == 2, fresh.stderr[-2000:]
    assert fresh.stderr.strip().count("\n") == 0
    assert f"{checkpoints} holds another run's checkpoints (step_0000003)" in fresh.stderr
    # The trainer's own advice for a new run from these weights (init_from) must not destroy them either.
    source = checkpoints / "step_0000003"
    follow = run_training(config, overrides=[f"train.init_from={source}", "checkpoint.resume=false"])
    assert follow.returncode == 2 and f"keep train.init_from={source} and start this run in a new directory" in (
        follow.stderr
    )
    assert digest(checkpoints) == before

    elsewhere = run_training(
        config, overrides=[f"train.init_from={source}", "checkpoint.resume=false", f"log.run_dir={tmp_path / 'b'}"]
    )
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    assert digest(checkpoints) == before


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run", train={"steps": 400})
    proc = start(config)
    log = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    stopped = len(metrics(tmp_path / "run"))
    assert f"stopping on signal {int(signal.SIGINT)} at step {stopped}; exit 130" in out
    resumed = run_training(config, overrides=["train.steps=" + str(stopped + 2)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped}" in resumed.stdout
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(1, stopped + 3))


def test_a_config_error_under_several_processes_is_one_line_and_exit_2(corpus, tmp_path):
    config = write_config(tmp_path / "config.yaml", corpus, tmp_path / "run")
    launcher = [sys.executable, str(REPO / "pretrain_scripts" / "pretrain_qsparse.py"), "--nproc-per-node", "2"]
    proc = subprocess.run(
        launcher + ["--config", str(config), "--set", "train.steps=0"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {config}: train.steps: must be >= 1"
    # Under a plain torchrun only rank 0 reports it (torchrun then prints its own summary).
    plain = subprocess.run(
        command(config, 2, ["train.steps=0"]), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120
    )
    assert plain.returncode != 0 and plain.stderr.count("train.steps: must be >= 1") == 1

    run = subprocess.run(
        launcher + ["--config", str(config), "--set", "train.steps=2"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "on 2 processes" in run.stdout and [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_an_unwritable_run_directory_is_one_line_and_exit_73(corpus, tmp_path):
    read_only = "/sys/qsparse-run"  # sysfs refuses new entries (root ignores permission bits)
    config = write_config(tmp_path / "config.yaml", corpus, read_only, train={"steps": 2})
    proc = run_training(config, timeout=120)
    assert proc.returncode == 73, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {read_only}") and "Traceback" not in proc.stderr
