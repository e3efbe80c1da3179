"""``use_sparse_kernel=True`` in the Hugging Face model: decode steps run through
``megatron_qsparse.inference.topk_linear`` and give what the default masked dense path gives.

Tiny random models built from a ``QSparseHFConfig`` (no training): Q-Sparse (50% with fc2 80%), Block Q-Sparse
(8:16), BitNet + Q-Sparse and MoE (4 experts, top-2), in fp32 and bf16. Logits of a prefill and a decode step
with and without the kernel agree within ``TOLERANCE`` of the largest logit: fp32 1e-5 (only the fp32 summation
order differs; measured ≤ 1e-6), bf16 1e-2 (a sum rounded the other way to bf16, 8 bits of mantissa, may also
flip a top-K selection downstream; measured 0). Greedy generate() gives the same tokens. Negative control: the
same weights run dense (no mask) differ by more than ``WRONG``, and generate other tokens, so the comparisons
can fail.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megatron_qsparse.inference as inference
from hf.compare import TINY_SHAPE, relative_error, unmasked
from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM, SiteLinear, linear
from megatron_qsparse.inference.gather_kernel import MAX_KERNEL_BATCH
from megatron_qsparse.sparsity.bitnet import quantize_weight_ternary

SPARSITY = {"qkv": 0.5, "proj": 0.5, "fc1": 0.5, "fc2": 0.8}
VARIANTS = {
    "qsparse": dict(sparsity=SPARSITY),
    "block": dict(sparsity={site: 0.5 for site in SPARSITY}, block_size=16),
    "bitnet": dict(sparsity=SPARSITY, bitnet=True),
    "moe": dict(sparsity=SPARSITY, num_experts=4, num_experts_per_tok=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
WRONG = 0.1  # the unmasked (wrong) path differs by more than this (measured ≥ 0.45), 10x the loosest tolerance
CASES = [(v, d) for v in VARIANTS for d in DTYPES]


def tiny_model(variant: str, dtype=torch.float32, seed: int = 0) -> QSparseForCausalLM:
    config = QSparseHFConfig(**TINY_SHAPE, **VARIANTS[variant])
    torch.manual_seed(seed)
    return QSparseForCausalLM(config).to(dtype).eval()


def prompt(length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on shared cores every OpenMP hand-off of a 2-thread op costs more than its work
    (a 16-token generate() took 1.4 s instead of 0.02 s under load). The threaded kernel: test_sparse_linear.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (tokens, weight_t) of every ``topk_linear`` call the model makes, then runs it."""
    calls, real = [], inference.topk_linear

    def spy(x, weight_t, *args, **kwargs):
        calls.append((x.shape[0], weight_t))
        return real(x, weight_t, *args, **kwargs)

    monkeypatch.setattr(inference, "topk_linear", spy)
    return calls


@torch.no_grad()
def prefill_and_decode(model, ids) -> torch.Tensor:
    """Logits of a prefill of ``ids`` and of one decode step (its greedy token) on the KV cache."""
    out = model(ids, use_cache=True)
    step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([out.logits, step.logits], dim=1)


def generate(model, ids, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True, **kwargs)


@pytest.mark.parametrize("variant,dtype", CASES)
def test_decode_logits_equal_masked_dense(variant, dtype, kernel_calls):
    model, ids = tiny_model(variant, DTYPES[dtype]), prompt()
    expected = prefill_and_decode(model, ids)
    assert not kernel_calls
    model.set_sparse_kernel(True)
    got = prefill_and_decode(model, ids)
    assert kernel_calls and {tokens for tokens, _ in kernel_calls} <= set(range(1, 13))  # MoE: subsets
    assert got.dtype == expected.dtype and got.shape == (1, 13, 256)
    assert relative_error(got, expected) <= TOLERANCE[DTYPES[dtype]]
    wrong = unmasked(model)
    wrong.set_sparse_kernel(False)
    assert relative_error(prefill_and_decode(wrong, ids), expected) > WRONG


@pytest.mark.parametrize("variant,dtype", CASES)
def test_greedy_generate_same_tokens(variant, dtype, kernel_calls):
    model, ids = tiny_model(variant, DTYPES[dtype]), prompt()
    dense = generate(model, ids)
    assert not kernel_calls
    sparse = generate(model, ids, use_sparse_kernel=True)
    assert len(kernel_calls) > 0 and sparse.shape == (1, 12 + 16)
    assert torch.equal(sparse, dense)
    assert not model.config.use_sparse_kernel  # the override lasted one call
    assert not any(m.use_sparse_kernel for m in model.modules() if isinstance(m, SiteLinear))
    assert not torch.equal(generate(unmasked(model), ids), dense)


def test_generate_override_restores_the_setting(kernel_calls):
    model, ids = tiny_model("qsparse"), prompt()
    model.set_sparse_kernel(True)
    generate(model, ids, use_sparse_kernel=False)
    assert not kernel_calls and model.config.use_sparse_kernel
    with pytest.raises(ValueError):  # an unknown argument: generate() fails, the setting still comes back
        generate(model, ids, use_sparse_kernel=False, not_an_argument=1)
    assert model.config.use_sparse_kernel
    assert all(m.use_sparse_kernel for m in model.modules() if isinstance(m, SiteLinear))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_prefill_stays_dense_then_decode_uses_kernel(dtype, kernel_calls):
    model, ids = tiny_model("qsparse", DTYPES[dtype]), prompt(MAX_KERNEL_BATCH + 16)
    expected = prefill_and_decode(model, ids)
    model.set_sparse_kernel(True)
    got = prefill_and_decode(model, ids)  # the prefill's F.linear now reads the input-major weight
    assert kernel_calls and all(tokens == 1 for tokens, _ in kernel_calls)  # only the decode step
    assert relative_error(got, expected) <= TOLERANCE[DTYPES[dtype]]
    model.set_sparse_kernel(False)  # masked dense again, prefill and decode, on the re-laid-out weight
    assert relative_error(prefill_and_decode(model, ids), expected) <= TOLERANCE[DTYPES[dtype]]


@pytest.mark.parametrize("tokens", [1, 3, 80])
def test_dense_product_of_an_input_major_bf16_weight(tokens):
    g = torch.Generator().manual_seed(tokens)
    weight, bias = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    x = torch.randn(1, tokens, 24, generator=g).bfloat16()
    got = linear(x, weight.t().contiguous().t(), bias)
    assert got.shape == (1, tokens, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-2, atol=1e-2)


def test_autograd_and_recording_keep_the_dense_path(kernel_calls):
    model, ids = tiny_model("qsparse"), prompt()
    model.set_sparse_kernel(True)
    model(ids).logits.sum().backward()  # autograd on: the kernel has no backward
    assert not kernel_calls and model.model.layers[0].mlp.down_proj.weight.grad is not None
    for module in model.modules():
        if isinstance(module, SiteLinear):
            module.record = True
    with torch.no_grad():
        model(ids)
    assert not kernel_calls and model.model.layers[0].mlp.down_proj.entries > 0


def parameter_bytes(model) -> int:
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


def test_weight_stored_once_input_major_and_saves(kernel_calls, tmp_path):
    model, ids = tiny_model("qsparse"), prompt()
    expected, size = prefill_and_decode(model, ids), parameter_bytes(model)
    model.set_sparse_kernel(True)
    prefill_and_decode(model, ids)
    assert parameter_bytes(model) == size
    sites = [m for m in model.modules() if isinstance(m, SiteLinear)]
    for module in sites:
        assert module.weight.t().is_contiguous()
    weights = {m.weight.data_ptr() for m in sites}
    assert {w.data_ptr() for _, w in kernel_calls} == weights  # the kernel read the parameters themselves
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "use_sparse_kernel" not in json.loads((tmp_path / "config.json").read_text())
    again = QSparseForCausalLM.from_pretrained(tmp_path, use_sparse_kernel=True).eval()
    assert again.config.use_sparse_kernel and all(
        m.use_sparse_kernel for m in again.modules() if isinstance(m, SiteLinear)
    )
    assert relative_error(prefill_and_decode(again, ids), expected) <= TOLERANCE[torch.float32]


def test_bitnet_ternary_weight_cached_and_refreshed(kernel_calls):
    model, ids = tiny_model("bitnet"), prompt()
    model.set_sparse_kernel(True)
    prefill_and_decode(model, ids)
    site = model.model.layers[0].mlp.gate_up_proj
    cached = site.ternary_weight_t()
    assert cached is site.ternary_weight_t()  # made once
    assert torch.equal(cached, quantize_weight_ternary(site.weight.detach()).t())
    assert any(w is cached for _, w in kernel_calls)
    with torch.no_grad():
        site.weight.mul_(-1.0)  # changed in place (as load_state_dict or an optimizer step does)
    assert torch.equal(site.ternary_weight_t(), -cached)
    model.to(torch.bfloat16)
    assert site.ternary_weight_t().dtype == torch.bfloat16


def test_refuses_without_the_package(monkeypatch, tmp_path):
    """A standalone export (no megatron_qsparse) asked for the kernel: a clear ImportError, the default works.
    (tests/hf/test_export.py checks the same on real exports loaded in a fresh process.)"""
    model = tiny_model("qsparse")
    model.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "megatron_qsparse", None)
    with pytest.raises(ImportError, match="pip install"):
        model.set_sparse_kernel(True)
    with pytest.raises(ImportError, match="masked dense path"):
        QSparseForCausalLM.from_pretrained(tmp_path, use_sparse_kernel=True)
    with pytest.raises(ImportError, match="pip install"):
        generate(model, prompt(), use_sparse_kernel=True)
    assert not model.config.use_sparse_kernel
    generate(model, prompt())


@pytest.mark.slow
def test_bench_decode_generate_section():
    """tools/bench_decode.py --generate --quick --json runs and reports what it promises (not how fast)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_decode.py"), "--generate", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["results"] == [] and report["generate"]["config"]["layers"] == 4
    rows = report["generate"]["results"]
    assert [(r["dtype"], r["sparsity"]) for r in rows] == [("fp32", 0.5), ("fp32", 0.6)]
    for r in rows:
        assert min(r["dense_tokens_per_s"], r["masked_tokens_per_s"], r["kernel_tokens_per_s"]) > 0
        assert r["kernel_vs_masked"] == pytest.approx(r["kernel_tokens_per_s"] / r["masked_tokens_per_s"])
        assert 0 <= r["agreeing_tokens"] <= 16
