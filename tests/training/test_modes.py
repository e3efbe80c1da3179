"""Non-finite losses, continue-training with a sparsity ramp, supervised finetuning, and resharding."""

import json
import math

import pytest
import torch
from distributed.launch import run_workers

from megatron_qsparse.training.checkpoint import find_latest
from training.conftest import metrics, run_training, write_config
from training.modes_cases import nonfinite_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    proc = run_training(write_config(root / "config.yaml", corpus, root / "run", train={"steps": 8}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "checkpoints"


def test_nonfinite_steps_are_skipped_then_abort_leaves_checkpoint(corpus, tmp_path):
    config = write_config(tmp_path / "a.yaml", corpus, tmp_path / "a", train={"steps": 8})
    (result,) = run_workers(1, nonfinite_run, str(config), {3, 4}, 5)
    assert result["exit_code"] == 0 and result["untouched"] == [True, True] and result["finite_params"]
    records = metrics(tmp_path / "a")
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))

    config = write_config(tmp_path / "b.yaml", corpus, tmp_path / "b", train={"steps": 12}, checkpoint={"interval": 2})
    (result,) = run_workers(1, nonfinite_run, str(config), set(range(5, 100)), 3)
    assert result["exit_code"] == 3  # documented: aborted after 3 consecutive non-finite losses
    latest = find_latest(tmp_path / "b" / "checkpoints")
    assert latest.name == "step_0000004"  # the last good checkpoint, intact
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 4


def test_continue_training_ramps_sparsity_from_dense(corpus, pretrained, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        corpus,
        tmp_path / "run",
        train={"steps": 6, "mode": "continue", "init_from": str(pretrained), "sparsity_ramp_steps": 4},
    )
    proc = run_training(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initializing weights from" in proc.stdout
    qkv = [r["sparsity"]["qkv"] for r in metrics(tmp_path / "run")]
    proj = [r["sparsity"]["proj"] for r in metrics(tmp_path / "run")]
    # target 0.5 over hidden 64: dense, then k = 56, 48, 40, 32 kept channels
    assert qkv == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert proj == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    # It starts from the trained weights, not from a fresh initialization.
    assert metrics(tmp_path / "run")[0]["loss"] < metrics(pretrained.parent)[0]["loss"] - 0.2


def test_sft_masks_the_prompt_and_learns(corpus, pretrained, tmp_path):
    from megatron_qsparse.data.gpt_data import SFTDataset
    from megatron_qsparse.data.tokenizer import load_tokenizer

    pairs = [{"prompt": d["text"][:160], "response": d["text"][160:400]} for d in corpus["docs"][:12]]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = load_tokenizer(corpus["tokenizer"])
    example = SFTDataset(sft, tokenizer, 64)[0]
    prompt_len = len(tokenizer.tokenize(pairs[0]["prompt"]))
    assert example["loss_mask"][: prompt_len - 1].sum() == 0  # labels inside the prompt: not trained
    assert example["loss_mask"][prompt_len - 1 :].all()  # the response (truncated to the window) is
    assert torch.equal(example["labels"][:-1], example["tokens"][1:])

    config = write_config(
        tmp_path / "s.yaml",
        corpus,
        tmp_path / "run",
        data={"sft": str(sft), "sft_valid": str(sft)},
        train={"steps": 10, "mode": "sft", "init_from": str(pretrained)},
        schedule={"warmup_steps": 0},
        optimizer={"lr": 2e-3, "min_lr": 2e-3},
        log={"eval_interval": 5, "eval_iters": 1},
    )
    proc = run_training(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r["eval"]["loss"] for r in metrics(tmp_path / "run") if "eval" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
