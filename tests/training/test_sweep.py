"""tools/sweep.py as a user runs it: a two-run grid, killed after the first run finished, then called again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_qsparse.model.summary import summarize
from megatron_qsparse.training.config import load_config
from training.conftest import REPO, environment, write_config


def sweep_command(sweep_file, *args):
    return [sys.executable, str(REPO / "tools" / "sweep.py"), str(sweep_file), *args]


def wait_for(path, process, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:  # bounded in time; stops early if the sweep ends
        if path.exists():
            return True
        time.sleep(0.5)
    return path.exists()


def test_killed_sweep_resumes_without_redoing_finished_runs(corpus, tmp_path):
    base = write_config(
        tmp_path / "base.yaml",
        corpus,
        tmp_path / "unused",
        model={"sparsity": {"default": 0.0}},
        train={"steps": 6},
        checkpoint={"interval": 2},
    )
    out = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"base": str(base), "output": str(out), "grid": {"model.sparsity.default": [0.0, 0.5]}})
    )
    first = out / "default=0.0" / "result.json"
    process = subprocess.Popen(
        sweep_command(sweep_file, "--jobs", "1"),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert wait_for(first, process, 300), "the first run did not finish"
        time.sleep(3)  # the second run is under way
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and its trainer, as a lost node would
        process.communicate(timeout=60)
    finished = first.read_text(), first.stat().st_mtime_ns
    assert not (out / "default=0.5" / "result.json").exists()

    again = subprocess.run(
        sweep_command(sweep_file), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 runs, 1 already finished, 1 to run" in again.stdout
    assert (first.read_text(), first.stat().st_mtime_ns) == finished  # not redone

    rows = (out / "results.csv").read_text().splitlines()
    header, values = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert header[:4] == ["name", "N", "N_a", "S"] and [v["name"] for v in values] == ["default=0.0", "default=0.5"]
    cfg = load_config(base, ["model.sparsity.default=0.5"])
    n = summarize(cfg.model)["block_linear_parameters_N"]
    assert [int(v["N"]) for v in values] == [n, n]
    assert [float(v["S"]) for v in values] == [0.0, 0.5]
    assert float(values[1]["S_realized"]) >= 0.5 - 1e-6  # top-K keeps at most half; ReLU² zeros only add
    assert [int(v["tokens"]) for v in values] == [6 * 8 * 64] * 2
    for v in values:
        result = json.loads((out / v["name"] / "result.json").read_text())
        metrics = [json.loads(line) for line in (out / v["name"] / "metrics.jsonl").read_text().splitlines()]
        assert float(v["loss"]) == pytest.approx(result["loss"]) == pytest.approx(metrics[-1]["eval"]["loss"])
        assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 7))  # the resumed run has each step once


def test_bad_sweep_file_is_named(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {"base": "pretrain_scripts/configs/tiny-cpu.yaml", "output": "x", "grid": {"model.sparsity.defualt": [0.5]}}
        )
    )
    proc = subprocess.run(sweep_command(sweep_file), cwd=REPO, env=environment(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "run defualt=0.5" in proc.stderr and "unknown key 'model.sparsity.defualt'" in proc.stderr
