"""Expert parallelism under DeepSpeed ZeRO: an MoE model (4 experts, top-2, Q-Sparse experts) trained at EP=2 equals
the one-process run, and resumes exactly from a checkpoint after SIGKILL.

Layouts: DP=2 × EP=2 with ZeRO-1 (each rank holds two experts; their expert-data-parallel group is the rank
itself), DP=4 × EP=2 with ZeRO-2 (experts also partitioned over a 2-rank expert-data-parallel group) and TP=2+SP ×
EP=2. Tolerances as in test_layouts.py (step 1: 2e-6 relative; later steps 2e-4 on the loss, 2e-3 on the gradient
norm, which catches a wrong averaging of the expert gradients). Measured: ≤ 1e-7 on both. Gradient clipping is
active (clip 1.0, norms reach 1.1).
"""

import pytest

from training.conftest import assert_same_trajectory, kill_tree, metrics, run_training, start, wait_for, write_config

pytestmark = pytest.mark.slow
MOE = {"num_experts": 4, "moe_router_topk": 2}
STEPS = 8
LAYOUTS = {  # name: (processes, overrides)
    "single": (1, []),
    "dp2-ep2-zero1": (2, ["parallel.ep=2", "optimizer.zero_stage=1"]),
    "dp4-ep2-zero2": (4, ["parallel.ep=2", "optimizer.zero_stage=2"]),
    "tp2-sp-ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
}


def moe_config(corpus, root, name, steps=STEPS, **sections):
    return write_config(root / f"{name}.yaml", corpus, root / name, model=MOE, train={"steps": steps}, **sections)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_parallel")
    for name, (nproc, overrides) in LAYOUTS.items():
        proc = run_training(moe_config(corpus, root, name), nproc, overrides)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("layout", ["dp2-ep2-zero1", "dp4-ep2-zero2", "tp2-sp-ep2"])
def test_expert_parallel_training_equals_single_process(runs, layout):
    assert_same_trajectory(runs / "single", runs / layout, STEPS)
    assert max(r["grad_norm"] for r in metrics(runs / "single")) > 1.0  # clipping took part


def test_expert_parallel_sigkill_then_resume_is_exact(corpus, tmp_path):
    """The per-rank ZeRO partitions of the expert groups save and load: after a SIGKILL the resumed losses are
    the uninterrupted run's, bit for bit."""
    nproc, overrides = LAYOUTS["dp2-ep2-zero1"]
    steps, settings = 12, {"checkpoint": {"interval": 3, "keep": 3}}
    uninterrupted = run_training(moe_config(corpus, tmp_path, "reference", steps, **settings), nproc, overrides)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    config = moe_config(corpus, tmp_path, "run", steps, **settings)
    proc = start(config, nproc, overrides)
    marker = tmp_path / "run" / "checkpoints" / "step_0000003" / "trainer_state.json"
    wait_for(marker.exists, proc, timeout=240)
    kill_tree(proc)
    proc.communicate(timeout=60)
    assert marker.exists(), "no checkpoint at step 3 before the kill"
    assert len(metrics(tmp_path / "run")) < steps, "the run finished before it was killed"

    resumed = run_training(config, nproc, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = [(r["step"], r["loss"]) for r in metrics(tmp_path / "run")]
    assert got == [(r["step"], r["loss"]) for r in metrics(tmp_path / "reference")]
