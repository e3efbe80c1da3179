"""Random Llama, Mistral and Qwen2 models made locally with transformers (nothing downloaded): import, then our
megatron model's loss on real text equals transformers' loss on the same tokens (fp32, ≤ 1e-5 relative);
import → export (stock format) returns the original tensors exactly; and continue-training from an import
follows the sparsity ramp."""

import json

import pytest
import torch
from distributed.launch import run_workers
from training.conftest import metrics, run_training, write_config

from hf.hf_cases import megatron_loss

pytestmark = pytest.mark.slow
VOCAB = 2048  # the corpus tokenizer's size, so that real text runs through the imported models


def make_stock_model(family: str, directory):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    config, cls = {
        "llama": (LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **common), LlamaForCausalLM),
        "mistral": (MistralConfig(num_key_value_heads=2, sliding_window=None, **common), MistralForCausalLM),
        "qwen2": (Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common), Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def text_tokens(corpus):
    from megatron_qsparse.data.tokenizer import load_tokenizer

    ids = load_tokenizer(corpus["tokenizer"]).tokenize(corpus["docs"][0]["text"])[: 2 * 33]
    return torch.tensor(ids).reshape(2, 33)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_import_matches_transformers_and_round_trips(family, tmp_path, text_tokens):
    from megatron_qsparse.hf.convert import import_stock, read_safetensors_dir

    stock = make_stock_model(family, tmp_path / "stock")
    with torch.no_grad():
        expected = float(stock(text_tokens, labels=text_tokens).loss)
    imported = import_stock(tmp_path / "stock", tmp_path / "imported", log=lambda m: None)
    (ours,) = run_workers(1, megatron_loss, str(imported), text_tokens)
    assert abs(ours - expected) <= 1e-5 * expected, (ours, expected)

    run_workers(1, _export_stock, str(imported), str(tmp_path / "back"))
    original, back = read_safetensors_dir(tmp_path / "stock"), read_safetensors_dir(tmp_path / "back")
    if family == "qwen2":  # tied: the stock file may or may not carry lm_head
        original.pop("lm_head.weight", None)
        back.pop("lm_head.weight", None)
    assert sorted(original) == sorted(back)
    for key in original:
        assert torch.equal(original[key], back[key]), key


def _export_stock(rank, world_size, checkpoint, output):
    from pathlib import Path

    from megatron_qsparse.hf.convert import export_checkpoint

    export_checkpoint(Path(checkpoint), Path(output), stock_format=True, log=lambda m: None)


def test_sparse_model_refuses_stock_export(tmp_path):
    from megatron_qsparse.hf.convert import _save_stock
    from megatron_qsparse.model import preset

    with pytest.raises(ValueError, match="would silently run dense"):
        _save_stock({}, preset("tiny", ["sparsity.default=0.5"]), tmp_path)


def test_continue_training_from_import_follows_ramp(corpus, tmp_path):
    from megatron_qsparse.hf.convert import import_stock

    make_stock_model("mistral", tmp_path / "stock")
    imported = import_stock(tmp_path / "stock", tmp_path / "imported", log=lambda m: None)
    model = json.loads((imported / "trainer_state.json").read_text())["config"]["model"]
    model.update(preset="tiny", seq_length=64, sparsity={"default": 0.5, "fc2": 0.8})
    config = write_config(
        tmp_path / "c.yaml",
        corpus,
        tmp_path / "run",
        train={"steps": 5, "mode": "continue", "init_from": str(imported), "sparsity_ramp_steps": 4},
    )
    text = config.read_text()
    import yaml

    data = yaml.safe_load(text)
    data["model"] = model
    config.write_text(yaml.safe_dump(data))
    proc = run_training(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    qkv = [r["sparsity"]["qkv"] for r in metrics(tmp_path / "run")]
    assert qkv == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
