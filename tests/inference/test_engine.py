"""The decode engine (``megatron_qsparse.inference.Engine``) against the Hugging Face export's masked dense forward.

Tiny exports (2 layers, hidden 64, 4 heads over 2 KV heads: GQA everywhere; one MHA case) of every variant are
saved with ``save_pretrained`` and loaded by the engine. At every position of a 20-token prompt the engine's
logits must equal ``QSparseForCausalLM``'s:
- fp32: within ``TOLERANCE`` = 1e-5 of the largest logit (only fp32 summation order differs; measured <= 1e-6).
- bf16: the engine's bf16 is bf16 *weights* with fp32 activations, KV cache and sums, so its exact reference is
  the fp32 forward of the bf16-rounded weights, under the same 1e-5. (The HF model run in bf16 rounds every
  activation to 8 mantissa bits, which moves top-K selections: it is not the same computation and no bound on
  it would test anything.)
- BitNet + Q-Sparse: packed ternary codes reproduce the fake-quantized weights exactly (tested by unpacking).
  The engine sums level x code exactly in integers; the fake-quantized fp32 forward does not, and the int8
  rounding downstream turns its last-bit differences into whole quantization steps (seen: 1 seed in 4 off by
  0.1 at some positions, while the engine stays within 2e-7 of the fp64 forward). So BitNet's reference is the
  fp64 forward of the same export, under the same 1e-5.
Negative control: the unmasked model differs by more than ``WRONG``. Greedy tokens equal ``generate()``'s on a
Q-Sparse model trained here on real text; sampling is reproducible with a seed and follows softmax(l / T).
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SLICE
from hf.compare import TINY_SHAPE, relative_error, unmasked

from megatron_qsparse import kernels
from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM, SiteLinear
from megatron_qsparse.inference.engine import Engine, EngineError, pack_ternary, unpack_ternary
from megatron_qsparse.sparsity.bitnet import quantize_weight_ternary

SPARSITY = {"qkv": 0.5, "proj": 0.5, "fc1": 0.5, "fc2": 0.8}
VARIANTS = {
    "dense": dict(),
    "qsparse": dict(sparsity=SPARSITY),
    "block": dict(sparsity={site: 0.5 for site in SPARSITY}, block_size=16),
    "bitnet": dict(sparsity=SPARSITY, bitnet=True),
    "bitnet-dense": dict(bitnet=True),
    "moe": dict(sparsity=SPARSITY, num_experts=4, num_experts_per_tok=2),
    "mha": dict(sparsity=SPARSITY, num_key_value_heads=4),
    "silu-layernorm-bias": dict(sparsity=SPARSITY, hidden_act="silu", normalization="layernorm", attention_bias=True),
    "tied": dict(sparsity=SPARSITY, tie_word_embeddings=True),
}
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
WRONG = 0.1


def tiny_model(variant: str, seed: int = 0, **overrides) -> QSparseForCausalLM:
    settings = dict(TINY_SHAPE, max_position_embeddings=64)
    settings.update(VARIANTS[variant], **overrides)
    torch.manual_seed(seed)
    model = QSparseForCausalLM(QSparseHFConfig(**settings)).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so that using them wrongly shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def prompt(length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def rounded(model: QSparseForCausalLM, dtype: str) -> QSparseForCausalLM:
    """The fp32 model whose matrices are rounded as the engine stores them at ``dtype`` (BitNet projections are
    packed ternary either way: their weights stay as exported)."""
    if dtype == "fp32":
        return model
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            site = isinstance(out.get_submodule(name.rsplit(".", 1)[0]), SiteLinear)
            if p.dim() == 2 and not (site and out.config.bitnet):
                p.copy_(p.bfloat16().float())
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """variant -> (model, export directory)"""
    out = {}
    for variant in VARIANTS:
        model = tiny_model(variant)
        directory = tmp_path_factory.mktemp(variant)
        model.save_pretrained(directory, safe_serialization=True)
        out[variant] = (model, directory)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_masked_dense_at_every_step(exports, variant, dtype):
    model, directory = exports[variant]
    ids = prompt()
    reference = rounded(model, dtype)
    if model.config.bitnet:
        reference = copy.deepcopy(reference).double()
    with torch.no_grad():
        expected = reference(ids).logits[0].float()
    engine = Engine.from_pretrained(directory, dtype=dtype, threads=2)
    got = engine.logits(ids)
    assert got.shape == (20, 256) and got.dtype == torch.float32
    assert relative_error(got, expected) <= TOLERANCE
    if variant not in ("dense", "bitnet-dense"):
        with torch.no_grad():
            assert relative_error(got, unmasked(reference)(ids).logits[0].float()) > WRONG


def test_threads_agree(exports):
    for variant in ("qsparse", "bitnet"):
        _, directory = exports[variant]
        one = Engine.from_pretrained(directory, dtype="fp32", threads=1).logits(prompt())
        two = Engine.from_pretrained(directory, dtype="fp32", threads=2).logits(prompt())
        assert relative_error(one, two) <= 1e-6
        if variant == "bitnet":  # integer sums, then one rounding
            assert torch.equal(one, two)


@pytest.mark.parametrize("shape", [(200, 72), (128, 64), (5, 3), (384, 256)])
def test_packed_ternary_reproduces_the_fake_quantized_weight(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    packed, alpha = pack_ternary(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[1], -(-shape[0] // 128) * 32)
    codes = unpack_ternary(packed, shape[0])
    assert set(codes.unique().tolist()) <= {-1, 0, 1} and (codes == 0).any() and (codes != 0).any()
    assert torch.equal(codes.float() * alpha, quantize_weight_ternary(weight))


def test_greedy_tokens_equal_hf_generate_on_a_trained_model(trained_export):
    model, directory, ids = trained_export
    expected = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)[0, 20:]
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=2)
    got = engine.generate(ids, max_new_tokens=32)
    assert got == expected.tolist()
    assert len(set(got)) >= 3  # not one token repeated (a tiny model soon loops: measured 3 distinct)
    stats = engine.stats
    assert stats.prompt_tokens == 20 and stats.new_tokens == 32 and stats.decode_tokens_per_s > 0
    bf16 = Engine.from_pretrained(directory, dtype="bf16", threads=2).generate(ids, max_new_tokens=32)
    expected_bf16 = rounded(model, "bf16").generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert bf16 == expected_bf16[0, 20:].tolist()


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, tokenizer):
    """A Q-Sparse model (50% at every site, ReLU² GLU) trained for 150 steps on the committed corpus slice."""
    docs = [json.loads(line)["text"] for line in SLICE.read_text().splitlines() if line.strip()]
    tokens = torch.tensor([t for doc in docs for t in tokenizer.tokenize(doc) + [tokenizer.eod]])
    model = tiny_model(
        "qsparse",
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=128,
        sparsity={site: 0.5 for site in SPARSITY},
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(tokens) - 65, (8,), generator=g)
        batch = torch.stack([tokens[s : s + 65] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 6.0  # it learned something (uniform: ln 2000 = 7.6; measured 5.7)
    model.eval()
    directory = tmp_path_factory.mktemp("trained")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.hf.save_pretrained(directory)
    return model, directory, tokens[1000:1020][None]


def test_generate_tool_streams_and_reports(trained_export, tokenizer, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import generate

    _, directory, _ = trained_export
    text = "In the beginning God created"
    expected = Engine.from_pretrained(directory, dtype="fp32", threads=1).generate(
        tokenizer.tokenize(text), 12, eos_token_id=tokenizer.eod
    )
    args = ["--model", str(directory), "--prompt", text, "--max-new-tokens", "12", "--dtype", "fp32", "--threads", "1"]
    assert generate.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new_ids"] == expected and report["text"] == tokenizer.detokenize(expected)
    assert report["prompt_tokens"] == len(tokenizer.tokenize(text)) and report["decode_tokens_per_s"] > 0
    assert generate.main(args) == 0
    out = capsys.readouterr()
    assert out.out == text + tokenizer.detokenize(expected) + "\n"  # streamed: the prompt, the new text, a newline
    assert "decode" in out.err and "tok/s" in out.err
    assert generate.main(["--model", str(directory / "missing"), "--prompt", "x"]) == 66
    assert "config.json" in capsys.readouterr().err
    assert generate.main(["--model", str(directory), "--prompt-ids", "1,2", "--max-new-tokens", "999"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_sampling_is_reproducible_and_follows_the_distribution(exports):
    _, directory = exports["qsparse"]
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=1)
    ids = prompt()
    greedy = engine.generate(ids, 12)
    a = engine.generate(ids, 12, temperature=1.5, seed=7)
    assert engine.generate(ids, 12, temperature=1.5, seed=7) == a
    assert engine.generate(ids, 12, temperature=1.5, seed=8) != a
    assert engine.generate(ids, 12, temperature=1.5, top_k=1, seed=3) == greedy
    assert engine.generate(ids, 12, temperature=1.0, top_p=1e-6, seed=3) == greedy
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    core = engine.core
    core.seed(0)
    draws = torch.tensor([core.sample(logits, 0.8, 0, 1.0) for _ in range(20000)])
    frequency = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.softmax(logits.double() / 0.8, 0)
    assert (frequency - expected).abs().max() < 4 * (expected * (1 - expected) / len(draws)).sqrt().max()
    assert set(core.sample(logits, 1.0, 2, 1.0) for _ in range(500)) == {0, 1}  # top-k 2
    top = torch.softmax(logits.double(), 0)  # top-p 0.8 keeps {0, 1, 2}: 0.63 + 0.23 < 0.8 <= + 0.14
    assert top[:2].sum() < 0.8 <= top[:3].sum()
    assert set(core.sample(logits, 1.0, 0, 0.8) for _ in range(2000)) == {0, 1, 2}


def test_eos_stops_generation(exports):
    _, directory = exports["qsparse"]
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=1)
    tokens = engine.generate(prompt(), 12)
    assert engine.generate(prompt(), 12, eos_token_id=tokens[3]) == tokens[: tokens.index(tokens[3]) + 1]


def test_clear_errors(exports, tmp_path, monkeypatch):
    _, directory = exports["qsparse"]
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=1, max_seq_len=24)
    with pytest.raises(EngineError, match="max_seq_len >= 30"):
        engine.generate(prompt(20), 10)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.generate([1, 256], 2)
    with pytest.raises(EngineError, match="dtype 'fp16'"):
        Engine.from_pretrained(directory, dtype="fp16")
    with pytest.raises(EngineError, match="config.json: not found"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EngineError, match="model_type 'llama'.*convert_from_hf"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text().replace('"relu2"', '"gelu"'))
    with pytest.raises(EngineError, match="hidden_act 'gelu'"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(EngineError, match="no \\*.safetensors"):
        Engine.from_pretrained(tmp_path)
    monkeypatch.setattr(kernels, "load", lambda: None)
    with pytest.raises(RuntimeError, match="compiled CPU kernels.*g\\+\\+"):
        Engine.from_pretrained(directory)


def test_benchmark_tool_reports_json():
    """``bench_decode.py --engine`` exits 0 with one JSON object (2 layers of the 300M shape: a smoke test; with
    llama-cpp-python installed, its rows come too)."""
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_decode.py"),
            "--engine",
            "--quick",
            "--layers",
            "2",
            "--new-tokens",
            "8",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    engine = [r for r in report["results"] if r["runtime"] == "engine"]
    assert {(r["dtype"], r["sparsity"]) for r in engine} == {("bf16", 0.0), ("bf16", 0.6), ("ternary", 0.6)}
    for r in report["results"]:
        assert r["shape"] == "300m" and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert report["config"]["threads"] == 1 and "llama" in report["config"]["llama_cpp"]


def batch_prompts():
    return [prompt(20, seed=1)[0].tolist(), prompt(13, seed=2)[0].tolist(), prompt(7, seed=3)[0].tolist()]


@pytest.mark.parametrize("variant", ["qsparse", "block", "bitnet", "moe", "dense"])
def test_batched_steps_equal_one_sequence_at_a_time(exports, variant):
    """Three sequences of different lengths stepped together (the projections read the union of their kept rows)
    give each sequence's own logits."""
    _, directory = exports[variant]
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=2, max_batch=3)
    prompts = batch_prompts()
    alone = [engine.logits(p) for p in prompts]
    core = engine.core
    core.reset()
    got = [[] for _ in prompts]
    for t in range(20):
        slots = [b for b, p in enumerate(prompts) if t < len(p)][::-1]  # not in slot order
        logits = core.step_batch([prompts[b][t] for b in slots], slots)
        assert logits.shape == (len(slots), 256)
        for row, b in enumerate(slots):
            got[b].append(logits[row].clone())
    assert core.positions() == [20, 13, 7]
    for b, expected in enumerate(alone):
        assert relative_error(torch.stack(got[b]), expected) <= TOLERANCE


def test_generate_batch_equals_one_generate_per_prompt(trained_export):
    model, directory, ids = trained_export
    engine = Engine.from_pretrained(directory, dtype="fp32", threads=2, max_batch=4)
    prompts = [ids[0].tolist(), ids[0, 5:].tolist(), ids[0, :9].tolist(), ids[0, 3:17].tolist()]
    expected = [engine.generate(p, 16) for p in prompts]
    assert engine.generate_batch(prompts, 16) == expected
    assert engine.stats.new_tokens == 64 and engine.stats.decode_tokens_per_s > 0
    with pytest.raises(EngineError, match="max_batch"):
        engine.generate_batch(prompts * 2, 4)
