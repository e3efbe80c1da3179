"""The scaling-law fit recovers known constants and S* from noisy synthetic losses; the CLI's JSON and errors."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_qsparse.sparsity.scaling_law import PAPER_CONSTANTS, Law, fit, fit_with_intervals

REPO = Path(__file__).resolve().parents[2]
TRUE = Law(E=2.0, B=0.5, C=20.0, alpha=0.25, beta=0.1)  # S* ≈ 60.8%, inside the grid of sparsities below
SIZES = (2e6, 4e6, 8e6, 16e6, 32e6)
SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8)


def synthetic(noise: float, seed: int = 1):
    N, S = (np.array(v, dtype=float) for v in zip(*[(n, s) for n in SIZES for s in SPARSITIES]))
    loss = TRUE.loss(N, S) * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(N)))
    return N, S, loss


def test_paper_constants_give_about_fifty_percent_not_the_reported_optimum():
    law = Law(**PAPER_CONSTANTS)
    assert law.optimal_sparsity() == pytest.approx(0.5024, abs=5e-4)
    # With B = 0 the optimum is exactly 1 - β/α (A(S)·(1-S)^α is stationary where β/(1-S) = α).
    assert Law(1.86, 0.0, 1.89, 0.10, 0.05).optimal_sparsity() == pytest.approx(0.5, abs=1e-6)
    assert Law(2.0, 0.0, 1.0, 0.1, 0.2).optimal_sparsity() == 0.0  # β > α: dense is best


def test_fit_recovers_exact_constants_without_noise():
    law = fit(*synthetic(0.0))
    for name, value in TRUE.as_dict().items():
        assert getattr(law, name) == pytest.approx(value, rel=2e-2), name
    assert law.optimal_sparsity() == pytest.approx(TRUE.optimal_sparsity(), abs=1e-3)


def test_fit_with_noise_brackets_the_true_optimum():
    report = fit_with_intervals(*synthetic(0.002), bootstrap=30, seed=0)
    true_s = TRUE.optimal_sparsity()
    assert report.S_star == pytest.approx(true_s, abs=0.02)
    low, high = report.intervals["S_star"]
    assert low <= true_s <= high and high - low < 0.1
    assert report.law.alpha == pytest.approx(TRUE.alpha, rel=0.15)
    assert report.bootstrap == 30


def write_csv(path: Path, rows, header=("N", "S", "loss", "bitnet")):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def run_tool(*args):
    return subprocess.run(
        [sys.executable, "tools/fit_scaling_law.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_cli_json_fits_only_the_chosen_precision(tmp_path):
    N, S, loss = synthetic(0.0)
    # BitNet rows from another law must not leak into the full-precision fit.
    rows = [(n, s, x, "false") for n, s, x in zip(N, S, loss)] + [(n, s, 5.0 + s, "true") for n, s in zip(N, S)]
    write_csv(tmp_path / "results.csv", rows)
    proc = run_tool(str(tmp_path / "results.csv"), "--json", "--bootstrap", "0")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"E", "B", "C", "alpha", "beta", "S_star", "intervals"} <= set(report)
    assert report["rows"] == len(N) and report["S_star"] == pytest.approx(TRUE.optimal_sparsity(), abs=2e-3)
    paper = json.loads(run_tool("--paper", "--json").stdout)
    assert paper["S_star"] == pytest.approx(0.5024, abs=5e-4) and paper["reported_S_star"]["full precision"] == 0.4558


@pytest.mark.parametrize(
    "rows,message",
    [
        ([(1e6, 0.5, "nan?", "false")], r"results.csv:2: column loss: 'nan\?' is not a number"),
        ([(1e6, 1.0, 3.0, "false")], r"results.csv:2: need N > 0, 0 <= S < 1"),
        ([(1e6, 0.5, 3.0, "maybe")], r"results.csv:2: column bitnet: 'maybe' is not true/false"),
        ([(1e6, 0.5, 3.0, "false")], r"1 full-precision rows with 1 sizes and 1 sparsities; the fit needs"),
    ],
)
def test_cli_bad_input_names_file_row_and_column(tmp_path, rows, message):
    write_csv(tmp_path / "results.csv", rows)
    proc = run_tool(str(tmp_path / "results.csv"))
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr


def test_cli_missing_column(tmp_path):
    write_csv(tmp_path / "results.csv", [(1, 2)], header=("N", "S"))
    proc = run_tool(str(tmp_path / "results.csv"))
    assert proc.returncode == 2 and "missing column(s) ['loss']" in proc.stderr
