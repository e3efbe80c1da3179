"""`make pretrain` exactly as the README runs it, limited in steps: corpus fetch (Debian packages, cached),
tokenizer, preprocessing, training, checkpoint, held-out evaluation, summary; the loss must fall."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_make_pretrain_step_limited(tmp_path):
    run_dir = tmp_path / "run"
    args = f"--set train.steps=30 --set log.eval_interval=10 --set log.run_dir={run_dir}"
    proc = subprocess.run(
        ["make", "--no-print-directory", "pretrain", f"ARGS={args}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary" in proc.stdout and "bits per byte" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["loss"] < records[0]["loss"] - 1.5  # from ~9.0 (ln 8192) down
    evals = [r["eval"]["loss"] for r in records if "eval" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (run_dir / "checkpoints" / "step_0000030" / "trainer_state.json").exists()
    assert any((run_dir / "tensorboard").iterdir())
