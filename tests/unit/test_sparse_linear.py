"""The decode-time sparse linear equals the masked dense product, whichever route computes it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qsparse.inference import SparseDecodeLinear, backend, gather_kernel, kept_channel_mask, topk_linear
from megatron_qsparse.inference.sparse_linear import gather_inputs
from megatron_qsparse.sparsity.topk import (
    block_topk_mask,
    kept_count,
    select_by_threshold,
    topk_mask,
    topk_mask_torch,
    topk_sparsify,
)

REPO = Path(__file__).resolve().parents[2]


def needs_kernel():
    if backend() != "cpp":
        pytest.skip("the gather kernel could not be built here")


@pytest.fixture(params=["kernel", "torch-fallback"])
def route(request, monkeypatch):
    """Run a test through the compiled kernel and through the torch fallback."""
    if request.param == "torch-fallback":
        monkeypatch.setattr(gather_kernel, "load_kernel", lambda: None)
    else:
        needs_kernel()
    return request.param


def masked_dense(x, weight, sparsity, block_size=None, bias=None):
    """The definition: Q-Sparse's masked input times Wᵀ, in fp32."""
    y = topk_sparsify(x.float(), sparsity, block_size) @ weight.float().T
    return y if bias is None else y + bias.float()


def assert_matches(y, expected, dtype):
    scale = expected.abs().max().clamp(min=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * scale)
    else:  # the fp32 accumulation is rounded once to bf16 (8 bits of mantissa)
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_features,out_features", [(64, 40), (96, 203), (640, 1000)])
def test_equals_masked_dense_product(route, dtype, sparsity, batch, in_features, out_features):
    g = torch.Generator().manual_seed(in_features + batch)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(batch, in_features, generator=g).to(dtype)
    y = SparseDecodeLinear(weight, sparsity)(x)
    assert y.dtype == dtype and y.shape == (batch, out_features)
    assert_matches(y, masked_dense(x, weight, sparsity), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_block_path_equals_block_masked_product(route, dtype, batch):
    g = torch.Generator().manual_seed(batch)
    weight = torch.randn(72, 128, generator=g).to(dtype)
    x = torch.randn(batch, 128, generator=g).to(dtype)
    y = SparseDecodeLinear(weight, 0.5, block_size=32)(x)
    assert_matches(y, masked_dense(x, weight, 0.5, block_size=32), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_bias_and_shared_weight(route, dtype):
    linear = torch.nn.Linear(48, 30).to(dtype)
    x = torch.randn(2, 3, 48).to(dtype)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    sparse = SparseDecodeLinear.from_linear(linear, 0.5)
    y = sparse(x)
    assert y.shape == (2, 3, 30) and y.dtype == dtype
    assert_matches(y, masked_dense(x, weight, 0.5, bias=bias), dtype)
    shared = SparseDecodeLinear(sparse.weight_t, 0.25, input_major=True)
    assert shared.weight_t.data_ptr() == sparse.weight_t.data_ptr()
    assert_matches(shared(x), masked_dense(x, weight, 0.25), dtype)


def test_set_sparsity_changes_the_selection_not_the_weight():
    weight, x = torch.randn(20, 64), torch.randn(1, 64)
    sparse = SparseDecodeLinear(weight, 0.5)
    sparse.set_sparsity(0.75)
    assert sparse.kept_rows(x).numel() == 16
    assert_matches(sparse(x), masked_dense(x, weight, 0.75), torch.float32)
    with pytest.raises(ValueError, match="does not divide"):
        sparse.set_sparsity(0.5, block_size=24)


@pytest.mark.parametrize("sparsity", [0.4, 0.5, 0.8])
def test_batch_one_reads_exactly_the_kept_channels(sparsity):
    x = torch.randn(1, 200)
    rows = SparseDecodeLinear(torch.randn(10, 200), sparsity).kept_rows(x)
    assert rows.numel() == kept_count(sparsity, 200)
    assert torch.equal(rows, topk_mask(x, kept_count(sparsity, 200))[0].nonzero().squeeze(1))  # ascending


def test_batch_reads_the_union_with_zeros_where_a_token_dropped_a_channel():
    x = torch.randn(3, 64)
    mask = kept_channel_mask(x, 0.5, block_size=16)
    assert (mask.reshape(3, 4, 16).sum(-1) == 8).all()  # N:M: 8 kept in every block of 16
    rows, values = gather_inputs(x, mask)
    assert torch.equal(rows, mask.any(0).nonzero().squeeze(1))
    assert torch.equal(values != 0, mask[:, rows])
    assert torch.equal(values[mask[:, rows]], x[:, rows][mask[:, rows]])


def test_a_different_selection_is_caught():
    """The comparison above is strict enough to see a mask off by one channel."""
    weight, x = torch.randn(40, 64), torch.randn(1, 64)
    y = SparseDecodeLinear(weight, 0.5)(x)
    mask = topk_mask(x, 32)
    kept, dropped = mask[0].nonzero()[-1, 0], (~mask[0]).nonzero()[0, 0]
    wrong = mask.clone()
    wrong[0, kept], wrong[0, dropped] = False, True  # swap one kept channel for a dropped one
    with pytest.raises(AssertionError):
        assert_matches(y, (x * wrong) @ weight.T, torch.float32)
    with pytest.raises(AssertionError):
        assert_matches(y, x @ weight.T, torch.float32)  # the unmasked product differs too


@pytest.mark.parametrize("kept", [0, 1, 7, 8, 9, 17])
@pytest.mark.parametrize("batch", [1, 2])
def test_kept_counts_around_the_kernels_8_row_passes(route, kept, batch):
    weight_t, x = torch.randn(30, 70), torch.randn(batch, 30)
    sparsity = 1 - kept / 30 if kept else 0.99
    assert kept_count(sparsity, 30) == kept
    expected = topk_sparsify(x, sparsity) @ weight_t
    torch.testing.assert_close(topk_linear(x, weight_t, None, sparsity), expected)


def test_other_dtypes_and_large_batches_take_the_torch_route():
    weight = torch.randn(24, 64)
    x = torch.randn(gather_kernel.MAX_KERNEL_BATCH + 1, 64)
    assert not gather_kernel.kernel_applies(x, weight.t().contiguous())
    assert_matches(SparseDecodeLinear(weight, 0.5)(x), masked_dense(x, weight, 0.5), torch.float32)
    assert not gather_kernel.kernel_applies(x[:0], weight.t().contiguous())  # no tokens: the torch route
    assert SparseDecodeLinear(weight, 0.5)(x[:0]).shape == (0, 24)
    y = SparseDecodeLinear(weight.half(), 0.5)(x[:2].half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), masked_dense(x[:2].half(), weight.half(), 0.5), rtol=1e-2, atol=1e-2)


def test_kernel_refuses_a_block_that_does_not_divide_the_row():
    needs_kernel()
    with pytest.raises(RuntimeError, match="segment must divide"):
        gather_kernel.compiled_topk_linear(torch.randn(1, 12), torch.randn(12, 8), None, 2, 5)


def fuzz_inputs(trials: int, sizes=(1, 70)):
    """Rows of random sizes: continuous, heavily tied (zeros included), with NaN and inf, and bf16."""
    g = torch.Generator().manual_seed(sizes[0])
    for trial in range(trials):
        size = int(torch.randint(*sizes, (), generator=g))
        kind = trial % 4
        if kind == 0:
            x = torch.randn(3, size, generator=g)
        elif kind == 1:
            x = torch.randint(-3, 4, (4, size), generator=g).float()
        elif kind == 2:  # NaN ranks above everything (and is never kept), inf is just large
            x = torch.randint(-3, 4, (4, size), generator=g).float()
            x[torch.rand(x.shape, generator=g) < 0.2] = float("nan")
            x[torch.rand(x.shape, generator=g) < 0.1] = -float("inf")
        else:
            x = torch.randn(2, size, generator=g).to(torch.bfloat16)
        yield x, int(torch.randint(-1, size + 2, (), generator=g))


def torch_route_mask(x, k):
    """topk_mask by its torch route (the definition the compiled selection must reproduce)."""
    if k >= x.shape[-1] or k <= 0:
        return topk_mask(x, k)
    return topk_mask_torch(x, k)


@pytest.mark.parametrize("sizes,trials", [((1, 70), 400), ((256, 3000), 60)])  # nth_element, bucket select
def test_kernel_selection_equals_topk_mask(sizes, trials):
    """Both compiled ops select with their own C++ code; they must pick exactly what the torch route picks."""
    needs_kernel()
    for x, k in fuzz_inputs(trials, sizes):
        size = x.shape[-1]
        mask = torch.empty(x.shape, dtype=torch.bool)
        gather_kernel.compiled_topk_linear(x, torch.zeros(size, 1), None, k, size, mask)
        expected = torch_route_mask(x, k)
        assert torch.equal(mask, expected), (x, k)
        assert torch.equal(topk_mask(x, k), expected), (x, k)


def test_kernel_selection_on_activation_like_rows():
    """Long rows with the shapes training sees: heavy tails, many exact zeros (after ReLU²), one bucket holding
    most entries (all equal but a few), NaN rows; fp32, bf16 and fp16 (ranked in fp32)."""
    needs_kernel()
    g = torch.Generator().manual_seed(7)
    rows = [
        torch.randn(64, 2752, generator=g) ** 3,
        torch.relu(torch.randn(64, 1024, generator=g)) ** 2,
        torch.ones(8, 4096).index_fill_(1, torch.tensor([3, 99, 4000]), 2.0),
        torch.randn(4, 1024, generator=g).index_fill_(1, torch.arange(0, 1024, 3), float("nan")),
    ]
    for x in rows:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            for k in (1, 3, x.shape[-1] // 2, x.shape[-1] - 1):
                assert torch.equal(topk_mask(xd, k), torch_route_mask(xd, k)), (dtype, k)


@pytest.mark.parametrize("block_size", [4, 16, 32])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_kernel_block_selection_equals_block_topk_mask(block_size, sparsity):
    needs_kernel()
    g = torch.Generator().manual_seed(block_size)
    for x in (torch.randn(3, 128, generator=g), torch.randint(-2, 3, (3, 128), generator=g).float()):
        mask = torch.empty(x.shape, dtype=torch.bool)
        gather_kernel.compiled_topk_linear(
            x, torch.zeros(128, 1), None, kept_count(sparsity, block_size), block_size, mask
        )
        assert torch.equal(mask, block_topk_mask(x, sparsity, block_size))


def test_kernel_is_built_where_a_compiler_exists():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    assert backend() == "cpp"


def test_decode_layer_sparse_step_equals_masked_dense_step():
    from megatron_qsparse.inference.decode_layer import DecodeLayer, LayerShape, random_weights, sparse_projections
    from megatron_qsparse.model import preset

    shape = LayerShape.from_config(preset("tiny", ["num_query_groups=2"]))
    weights = random_weights(shape, torch.float32)
    masked = {site: (lambda w: lambda t: topk_sparsify(t, 0.5) @ w.T)(w) for site, w in weights.items()}  # noqa: B023
    x = torch.randn(2, shape.hidden)
    sparse = DecodeLayer(shape, sparse_projections(weights, 0.5), batch=2)(x)
    assert_matches(sparse, DecodeLayer(shape, masked, batch=2)(x), torch.float32)


def test_decode_layer_dense_step_equals_a_plain_decoder_layer():
    """The benchmark's step is a real decoder layer: RMSNorm, GQA attention over the cache plus the new token,
    residuals, GLU MLP, written out here op by op."""
    from megatron_qsparse.inference.decode_layer import DecodeLayer, LayerShape, dense_projections, random_weights
    from megatron_qsparse.sparsity.activations import activation_by_name

    shape = LayerShape(hidden=64, ffn=96, heads=8, kv_heads=2, head_dim=8, activation="relu2")
    weights = random_weights(shape, torch.float32)
    layer = DecodeLayer(shape, dense_projections(weights), batch=2, kv_cache_len=5)
    keys, values = layer.keys.clone(), layer.values.clone()
    x = torch.randn(2, 64)
    got = layer(x)

    def norm(t):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()

    q, k, v = (norm(x) @ weights["qkv"].T).split([64, 16, 16], -1)
    keys[:, :, -1], values[:, :, -1] = k.view(2, 2, 8), v.view(2, 2, 8)
    keys, values = keys.repeat_interleave(4, dim=1), values.repeat_interleave(4, dim=1)  # 4 query heads per KV
    scores = (q.view(2, 8, 1, 8) @ keys.transpose(-1, -2)) / 8**0.5
    h = x + (scores.softmax(-1) @ values).reshape(2, 64) @ weights["proj"].T
    gate, up = (norm(h) @ weights["fc1"].T).chunk(2, -1)
    expected = h + (activation_by_name("relu2")(gate) * up) @ weights["fc2"].T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- topk_mask's CPU selections (compiled; kthvalue + tie break) equal the sort-based version ----------------
def sorted_topk_mask(x, k):
    """topk_mask as first written: the k-th value from a sorted topk, ties broken for every row."""
    if k >= x.shape[-1]:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    mag = x.detach().abs().float()
    kth = torch.topk(mag, k, dim=-1, sorted=True).values[..., -1:]
    return select_by_threshold(mag, kth, k - (mag > kth).sum(-1, keepdim=True))


def test_topk_mask_equals_sorted_selection_with_ties_nans_and_layouts():
    for trial, (x, k) in enumerate(fuzz_inputs(400)):
        if trial % 8 == 7:
            x = x.t().contiguous().t()  # a non-contiguous layout
        expected = sorted_topk_mask(x, k)
        assert torch.equal(topk_mask(x, k), expected), (trial, k)
        assert torch.equal(torch_route_mask(x, k), expected), (trial, k)
    assert topk_mask(torch.randn(0, 8), 3).shape == (0, 8)


# ---- the benchmark tools run and report what they promise (not how fast) ------------------------------------
def run_tool(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / script), "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_bench_decode_quick_json():
    report = run_tool("bench_decode.py")
    assert {"cpu", "torch_threads"} <= set(report["machine"])
    assert report["config"]["backend"] in ("cpp", "torch")
    parts = {(r["sparsity"], r["part"]) for r in report["results"]}
    assert parts == {(s, p) for s in (0.5, 0.6) for p in ("qkv", "proj", "fc1", "fc2", "layer")}
    for r in report["results"]:
        assert r["sparse_ms"] > 0 and r["dense_torch_ms"] > 0 and r["dense_kernel_ms"] > 0
        assert r["speedup"] == pytest.approx(min(r["dense_torch_ms"], r["dense_kernel_ms"]) / r["sparse_ms"])
        assert r["part"] == "layer" or r["rows_read"] == pytest.approx(1 - r["sparsity"], abs=1e-3)
    assert {(g["sparsity"], g["goal"]) for g in report["goals"]} == {(0.5, 1.8), (0.6, 2.2)}


@pytest.mark.slow
def test_bench_train_overhead_quick_json():
    report = run_tool("bench_train_overhead.py")
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["dense", "qsparse-50%", "block-16:32", "bitnet", "bitnet+qsparse-50%"]
    for r in report["results"]:
        assert r["step_ms"] > 0 and r["vs_dense"] == pytest.approx(r["step_ms"] / report["results"][0]["step_ms"])
