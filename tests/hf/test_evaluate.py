"""tools/convert_to_hf.py then tools/evaluate.py on a trained checkpoint, as a user runs them."""

import json
import subprocess
import sys

import pytest
from training.conftest import REPO, environment, run_training, write_config

pytestmark = pytest.mark.slow


def test_export_then_evaluate(corpus, tmp_path):
    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", train={"steps": 6})
    assert run_training(config).returncode == 0
    export = subprocess.run(
        [
            sys.executable,
            "tools/convert_to_hf.py",
            "--checkpoint",
            str(tmp_path / "run" / "checkpoints"),
            "--output",
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "tokenizer.json").exists()  # the run's tokenizer travels with the export
    again = subprocess.run(
        [
            sys.executable,
            "tools/convert_to_hf.py",
            "--checkpoint",
            str(tmp_path / "run" / "checkpoints"),
            "--output",
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 73 and "not empty" in again.stderr  # never overwrites an export

    proc = subprocess.run(
        [
            sys.executable,
            "tools/evaluate.py",
            "--model",
            str(tmp_path / "hf"),
            "--data",
            str(corpus["train_jsonl"]),
            "--max-docs",
            "3",
            "--choices",
            "12",
            "--json",
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert 0 < result["heldout_loss"] < 8.0 and 0 < result["bits_per_byte"] < 4.0
    assert 0.0 <= result["multiple_choice_accuracy"] <= 1.0
    # The test model: 50% at qkv / proj / fc1 (hidden 64: exactly 32 kept), 80% at fc2 plus ReLU² zeros.
    s = result["realized_sparsity"]
    assert s["qkv"] == pytest.approx(0.5) and s["proj"] == pytest.approx(0.5) and s["fc1"] == pytest.approx(0.5)
    assert s["fc2"] >= 0.8
    assert result["activated_parameters_N_a"] < 0.45 * result["block_linear_parameters_N"]
