"""Pipeline parallelism with tied embeddings, with expert parallelism, and interleaved (virtual pipeline stages),
equal the one-process run.

Tied embeddings (``model.tie_embeddings=true``): PP=2 with ZeRO-1 (2 processes) and TP=2 × PP=2 with ZeRO-1 (4
processes) follow the one-process trajectory, and the last stage's copy of the word-embedding matrix equals the
first stage's before training and after the last update. Those two runs are the trainer itself (``Trainer(cfg)
.train()``, as the CLI runs it) in worker processes, so that the copies can be compared at the end. MoE (4
experts, top-2) at EP=2 × PP=2 with ZeRO-1 (4 processes) follows the one-process trajectory. A tied PP=2 checkpoint
resumes on one process (PP=1) and continues the PP=2 run's losses. Interleaved 1F1B (``parallel.vpp=2``) at PP=2 on
2 processes (4 layers: chunk 0 of rank 0 holds layer 0 and the embedding, rank 1's chunk 1 layer 3 and the tied
output layer) follows the one-process trajectory, and its checkpoint resumes on one process.

Tolerances. Trajectories as in test_layouts.py: step 1 within 2e-6 relative on the loss and the gradient norm, later
steps 2e-4 on the loss and 2e-3 on the gradient norm (measured ≤ 1e-7 on both, for all three layouts). What they
catch (measured at PP=2): without the gradient exchange the step-1 gradient norm is 25% low and the losses leave
the bound by step 2; counting the last stage's copy in the norm as well makes it 37% high. The tied copies: equal
within 1e-6 of the largest magnitude (measured bit-equal; without the exchange they differ by 3.5e-2 after 10
steps). The resume: within 3e-3 relative of the PP=2 run at every resumed step, the bound of test_elastic.py
(measured: equal).
"""

import pytest

from training.conftest import (
    assert_same_trajectory,
    metrics,
    resumed_loss_gaps,
    run_training,
    seed_with_checkpoint,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS, SAVED_AT = 10, 5
TIED = dict(model={"tie_embeddings": True}, train={"steps": STEPS}, checkpoint={"interval": SAVED_AT, "keep": 3})
TIED_LAYOUTS = {  # name: (processes, overrides)
    "pp2-zero1": (2, ["parallel.pp=2", "optimizer.zero_stage=1"]),
    "tp2pp2-zero1": (4, ["parallel.tp=2", "parallel.pp=2", "optimizer.zero_stage=1"]),
}
MOE = dict(model={"num_experts": 4, "moe_router_topk": 2}, train={"steps": 8})
EP_PP = (4, ["parallel.ep=2", "parallel.pp=2", "optimizer.zero_stage=1"])
VPP = dict(model={"num_layers": 4, "tie_embeddings": True}, train={"steps": 8}, checkpoint={"interval": 4, "keep": 3})
PP_VPP = (2, ["parallel.pp=2", "parallel.vpp=2", "optimizer.zero_stage=1"])
COPY_TOLERANCE = 1e-6  # relative to the largest magnitude of the matrix
RESUME_TOLERANCE = 3e-3


def _tied_copies_gap(model):
    """Collective over the embedding group: the largest difference between the two tied copies, relative to the
    largest magnitude (None on a rank that holds no copy)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_qsparse.parallel.embedding_grads import tied_embedding_copy

    weight = tied_embedding_copy(model)
    if weight is None:
        return None
    both = [torch.empty_like(weight) for _ in range(2)]
    dist.all_gather(both, weight.detach().contiguous(), group=ps.get_embedding_group())
    return float((both[0] - both[1]).abs().max() / both[0].abs().max())


def train_and_measure_copies(rank, world_size, config, overrides):
    """Worker: the trainer on ``config``; the tied copies' gap after construction and after training."""
    from megatron_qsparse.training.config import load_config
    from megatron_qsparse.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides).validate(world_size))
    at_start = _tied_copies_gap(trainer.model)
    summary = trainer.train()
    return {"start": at_start, "end": _tied_copies_gap(trainer.model), "steps": summary["steps"]}


@pytest.fixture(scope="module")
def tied_runs(corpus, tmp_path_factory):
    from distributed.launch import run_workers

    root = tmp_path_factory.mktemp("tied_pipeline")
    proc = run_training(write_config(root / "single.yaml", corpus, root / "single", **TIED))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    copies = {}
    for name, (nproc, overrides) in TIED_LAYOUTS.items():
        config = write_config(root / f"{name}.yaml", corpus, root / name, **TIED)
        copies[name] = run_workers(nproc, train_and_measure_copies, str(config), overrides)
    return root, copies


@pytest.mark.parametrize("layout", list(TIED_LAYOUTS))
def test_tied_embeddings_under_pipeline_parallelism_equal_single_process(tied_runs, layout):
    root, copies = tied_runs
    assert_same_trajectory(root / "single", root / layout, STEPS)
    reference = metrics(root / "single")
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.3  # and it learns
    assert max(r["grad_norm"] for r in reference) > 1.0  # clipping took part
    # At PP=2 every rank is a first or last stage: each holds a copy, and both copies are one matrix.
    per_rank = copies[layout]
    assert all(r["steps"] == STEPS and r["start"] is not None for r in per_rank), per_rank
    assert max(max(r["start"], r["end"]) for r in per_rank) <= COPY_TOLERANCE, per_rank


def test_tied_pipeline_checkpoint_resumes_on_one_process(tied_runs, corpus, tmp_path):
    """The tied matrix is written once (by the first stage) and its optimizer state with it; at PP=1 it loads
    into the one matrix, and the run continues the PP=2 run's losses."""
    root, _ = tied_runs
    written_by = root / "pp2-zero1"
    _assert_resumes_on_one_process(written_by, SAVED_AT, STEPS, TIED, corpus, tmp_path / "run")


def _assert_resumes_on_one_process(written_by, step: int, steps: int, settings: dict, corpus, run_dir) -> None:
    """``written_by``'s checkpoint of ``step`` resumed by one process continues its losses (RESUME_TOLERANCE)."""
    seed_with_checkpoint(written_by / "checkpoints" / f"step_{step:07d}", run_dir)
    proc = run_training(write_config(run_dir.parent / f"{run_dir.name}.yaml", corpus, run_dir, **settings))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resharded" in proc.stdout
    gaps = resumed_loss_gaps(written_by, run_dir, step + 1, steps)
    assert max(gaps) <= RESUME_TOLERANCE, gaps


def test_expert_parallel_with_pipeline_parallel_equals_single_process(corpus, tmp_path):
    for name, (nproc, overrides) in {"single": (1, []), "ep2-pp2": EP_PP}.items():
        proc = run_training(write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **MOE), nproc, overrides)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert_same_trajectory(tmp_path / "single", tmp_path / "ep2-pp2", MOE["train"]["steps"])
    assert max(r["grad_norm"] for r in metrics(tmp_path / "single")) > 1.0  # clipping took part


def test_interleaved_pipeline_equals_single_process_and_resumes_on_one(corpus, tmp_path):
    for name, (nproc, overrides) in {"single": (1, []), "pp2-vpp2": PP_VPP}.items():
        proc = run_training(write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **VPP), nproc, overrides)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "layout tp1pp2vpp2 on 2 processes" in proc.stdout
    steps = VPP["train"]["steps"]
    assert_same_trajectory(tmp_path / "single", tmp_path / "pp2-vpp2", steps)
    # Its step-4 checkpoint (keys of the whole model: nothing says it was chunked) continues on one process.
    _assert_resumes_on_one_process(tmp_path / "pp2-vpp2", 4, steps, VPP, corpus, tmp_path / "resumed")
