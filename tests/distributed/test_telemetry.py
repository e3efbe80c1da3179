import pytest

from distributed.launch import run_workers
from distributed.telemetry_cases import recorded_sparsity

pytestmark = pytest.mark.slow


def test_recorded_sparsity_follows_site_ratios_and_counts_relu2_zeros():
    # qsparse variant: 50% at qkv/proj/fc1, 80% at fc2; ReLU² adds natural zeros at fc2's input (mlp-mid).
    (single,) = run_workers(1, recorded_sparsity, "qsparse", 1)
    assert single["qkv"] == pytest.approx(0.5) and single["proj"] == pytest.approx(0.5)
    assert single["fc1"] == pytest.approx(0.5)
    assert 0.8 <= single["fc2"] < 0.9
    # Under TP=2 the column-parallel inputs are whole on each rank; the row-parallel ones are split, and the
    # global top-K lands unevenly on the shards, whose average is the whole row's sparsity.
    sharded = run_workers(2, recorded_sparsity, "qsparse", 2)
    for site in ("qkv", "fc1"):
        assert all(r[site] == pytest.approx(single[site]) for r in sharded)
    for site in ("proj", "fc2"):
        assert (sharded[0][site] + sharded[1][site]) / 2 == pytest.approx(single[site], abs=1e-6)
    assert sharded[0]["proj"] != sharded[1]["proj"]


def test_dense_model_records_only_natural_zeros():
    (dense,) = run_workers(1, recorded_sparsity, "dense", 1)
    assert dense["qkv"] == 0.0 and dense["fc1"] == 0.0
    assert dense["fc2"] > 0.3  # ReLU(gate)² is zero wherever gate < 0
