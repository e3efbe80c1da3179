"""tools/gradient_norms.py against autograd in the exported Hugging Face model: the same checkpoint, the same
tokens, the per-projection gradient norms of every layer agree (a wrong q/k/v or gate/up split, a lost STE or a
different loss would not)."""

import json
import subprocess
import sys

import pytest
import torch
from training.conftest import REPO, environment, run_training, write_config

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "tools"))


def test_norms_equal_the_hf_models_gradients(corpus, tmp_path):
    from gradient_norms import PROJECTIONS, token_batches
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", train={"steps": 4})
    assert run_training(config).returncode == 0
    checkpoints = str(tmp_path / "run" / "checkpoints")
    measured = subprocess.run(
        [
            sys.executable,
            "tools/gradient_norms.py",
            checkpoints,
            "--data",
            corpus["valid"],
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--json",
        ],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert measured.returncode == 0, measured.stderr[-3000:]
    (result,) = json.loads(measured.stdout)
    export = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", "--checkpoint", checkpoints, "--output", str(tmp_path / "hf")],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).train()
    windows = token_batches(corpus["valid"], 2, 2, model.config.max_position_embeddings)
    for window in windows:
        logits = model(window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten()) / 2
        loss.backward()
    q_rows = model.config.num_attention_heads * model.config.head_dim
    kv_rows = model.config.num_key_value_heads * model.config.head_dim
    assert kv_rows < q_rows  # GQA: a q/k/v split by the wrong sizes would show
    for i, layer in enumerate(model.model.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.grad.split([q_rows, kv_rows, kv_rows])
        gate, up = layer.mlp.gate_up_proj.weight.grad.chunk(2)
        expected = {
            "q": q,
            "k": k,
            "v": v,
            "o": layer.self_attn.o_proj.weight.grad,
            "gate": gate,
            "up": up,
            "down": layer.mlp.down_proj.weight.grad,
        }
        for short in PROJECTIONS:
            got = result["grad_norm"][short][i]
            assert got == pytest.approx(float(expected[short].norm()), rel=1e-4), (i, short)
