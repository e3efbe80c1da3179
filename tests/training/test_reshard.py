"""A TP=2 checkpoint loads at TP=1 (and at PP=2) with the same logits (fp32: ≤ 1e-6 of the largest logit;
measured ≈ 1e-7, the order of TP's partial sums). The loaders initialize with another seed first, so equal
logits mean the checkpoint's weights were loaded."""

import pytest
from distributed.launch import run_workers

from megatron_qsparse.parallel.state import ParallelLayout
from training.reshard_cases import load_under, save_under

pytestmark = pytest.mark.slow


def test_tp2_checkpoint_loads_at_tp1_and_pp2(tmp_path):
    saved = run_workers(2, save_under, ParallelLayout(tp=2), str(tmp_path))
    reference = saved[0]
    assert reference is not None and reference.shape == (2, 16, 256)
    (tp1,) = run_workers(1, load_under, ParallelLayout(), str(tmp_path))
    pp2 = run_workers(2, load_under, ParallelLayout(pp=2), str(tmp_path))[1]
    scale = reference.abs().max()
    assert (tp1 - reference).abs().max() <= 1e-6 * scale
    assert (pp2 - reference).abs().max() <= 1e-6 * scale
