"""Triton kernel of the sparse decode product: the GPU route of ``megatron_qsparse.inference.sparse_linear``.

``sparse_gemv(x, mask, weight_t, bias)`` computes ``(x ⊙ mask) @ weight_t + bias`` for a few tokens (batch 1 to
16) with fp32 accumulation, reading only the rows of the input-major weight ``weight_t`` [in, out] that some
token keeps (TEAL's observation: a zero input makes its whole weight row useless, and at batch 1 the product is
bound by the bytes of weight read). It replaces the torch route ``gather_inputs`` + ``index_select`` + ``mm``,
which copies the kept rows before multiplying them, with one pass over the weight. Tested equal to that route
(``tests/unit/test_triton_decode.py``).

Which rows are read: predicated loads, not a compacted index list. Each program walks its slice of the input
rows in chunks of ``BLOCK_K``; per chunk it loads the tokens' mask bytes (a few hundred bytes, from L2), takes
their union, and loads the weight tile with that union as the predicate. A predicated-off row moves no data:
its ``ld.global`` / ``cp.async`` (zero-filling) lanes never reach memory, and a row segment of a program is
``BLOCK_OUT`` contiguous entries (256-512 bytes), so no sector holds both kept and dropped rows. A compacted
list (the kept row indices, packed) would keep every load lane busy at high sparsity, but building it needs a
prefix sum over the union: another kernel launch of a few microseconds, as long as the whole product at the
7B shapes (4096 x 4096 bf16 at 50% is 16 MB: ~3.5 us at 4.8 TB/s), or a count the host must read (a sync).
Predication keeps it to the product's one launch (two with the split combine below). Bytes read per call:
``|union of kept rows| * out * itemsize`` of weight from HBM (at batch 1: ``(1 - s)`` of the weight; at batch B
the union grows, ~94% of the rows for 4 independent 50% masks, and each token's share is ``1 / B`` of it), plus
``x`` and ``mask`` (``B * in * (itemsize + 1)`` bytes per output block, L2-resident) and the fp32 partial sums.

Work split (an H200 has 132 SMs): the grid is (output blocks, input splits). ``out / BLOCK_OUT`` blocks alone
are 16-112 programs at the 7B shapes, too few to keep 132 SMs streaming, so the input rows are split too, for
about ``4 * SMs`` programs of at least ``MIN_CHUNKS`` chunks each (4096 -> 4096 at batch 1: 16 x 32 programs of
128 rows). Each split writes its fp32 partial ``[split, B, out]`` (a few hundred KB at most, kept in the 50 MB
L2), and a second kernel adds the splits in a fixed order, adds the bias in fp32 and casts: deterministic (the
same bits on every call for the same shapes), unlike fp32 atomics, and as cheap (atomics need a zeroed buffer
and a cast pass: two launches as well). With one split the product kernel finishes the job itself.

Arithmetic. Loads along ``out`` are contiguous and 16-byte vectorised where ``out`` is a multiple of 16 (Triton
specialises such sizes: every 7B shape). Batch 1: the tile is multiplied by the token's inputs elementwise into
an fp32 ``[BLOCK_K, BLOCK_OUT]`` accumulator and reduced over ``K`` once at the end (no reduction per chunk).
Batch 2-16: ``tl.dot`` of the tokens (padded to 16 rows) with the tile on the tensor cores (bf16 / fp16 products
are exact in fp32, accumulated in fp32; fp32 weights take the IEEE fp32 FMA path, 8x the needed multiplies at
batch 2, still below the memory time). A token's dropped inputs are loaded as zero (its mask predicates the
load of ``x``), so a non-finite value there does not reach ``y``, as in the torch route's gathered product but
unlike a literal ``(x * mask)`` (NaN * 0 = NaN): for finite inputs both are the same.

``out_dtype=torch.float32`` returns the fp32 result before the final cast (how the tests compare bf16 / fp16
products with the torch route's fp32 accumulation).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_qsparse.kernels.triton_bitnet import cast_nearest_even
from megatron_qsparse.kernels.triton_routes import interpreting

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BATCH = 16  # tokens per call: the tensor-core tile's rows
DOT_ROWS = 16  # the tokens padded to this for tl.dot
SINGLE_TOKEN_BLOCKS = (32, 256)  # (BLOCK_K, BLOCK_OUT) at batch 1: 32 rows of 512 B (bf16) per chunk
BATCH_BLOCKS = {2: (64, 128), 4: (32, 128)}  # by itemsize, batch 2-16: tiles of 16 KB
MIN_CHUNKS = 4  # chunks per program at least: each program streams a few tiles
PROGRAMS_PER_SM = 4
DEFAULT_SMS = 132  # an H200's SM count: the grid's shape where no GPU says otherwise (the interpreter)
COMBINE_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _single_token_partial(
    x_ptr,
    mask_ptr,
    w_ptr,
    k_start,
    n_in,
    n_out,
    cols,
    col_ok,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    ITERS: tl.constexpr,
):
    """sum over the slice's kept rows k of x[k] * w[k, cols], as [1, BLOCK_OUT] fp32 (summed over k once, at the
    end)."""
    lanes = tl.zeros([BLOCK_K, BLOCK_OUT], dtype=tl.float32)
    for i in range(ITERS):
        ks = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        kept = tl.load(mask_ptr + ks, mask=ks < n_in, other=0) != 0
        x = tl.load(x_ptr + ks, mask=kept, other=0.0).to(tl.float32)
        w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * n_out + cols[None, :]
        w = tl.load(w_ptrs, mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        lanes += x[:, None] * w
    return tl.sum(lanes, axis=0)[None, :]


@triton.jit
def _tokens_partial(
    x_ptr,
    mask_ptr,
    w_ptr,
    k_start,
    n_tokens,
    n_in,
    n_out,
    stride_x,
    stride_mask,
    cols,
    col_ok,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    ITERS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """sum over the slice's rows k that any token keeps of x[b, k] * w[k, cols] (x zero where token b dropped k),
    as [BLOCK_B, BLOCK_OUT] fp32."""
    tokens = tl.arange(0, BLOCK_B)
    token_ok = tokens < n_tokens
    acc = tl.zeros([BLOCK_B, BLOCK_OUT], dtype=tl.float32)
    for i in range(ITERS):
        ks = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        in_range = token_ok[:, None] & (ks < n_in)[None, :]
        kept = tl.load(mask_ptr + tokens[:, None] * stride_mask + ks[None, :], mask=in_range, other=0) != 0
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=kept, other=0.0)
        union = tl.max(kept.to(tl.int32), axis=0) > 0
        w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * n_out + cols[None, :]
        w = tl.load(w_ptrs, mask=union[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:  # fp32 weights; or bf16 in the interpreter, whose dot reads bf16 as raw integers
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,
    mask_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    n_tokens,
    n_in,
    n_out,
    stride_x,
    stride_mask,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    ITERS: tl.constexpr,
    SINGLE_TOKEN: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    FINAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Grid (output blocks, input splits): program (o, s) sums input rows [s * ITERS * BLOCK_K, ...) for outputs
    [o * BLOCK_OUT, ...). FINAL (one split): adds the bias and writes y; else writes the fp32 partial [s, b, o]."""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_ok = cols < n_out
    k_start = split * (ITERS * BLOCK_K)
    if SINGLE_TOKEN:
        acc = _single_token_partial(
            x_ptr, mask_ptr, w_ptr, k_start, n_in, n_out, cols, col_ok, BLOCK_K, BLOCK_OUT, ITERS
        )
    else:
        acc = _tokens_partial(
            x_ptr,
            mask_ptr,
            w_ptr,
            k_start,
            n_tokens,
            n_in,
            n_out,
            stride_x,
            stride_mask,
            cols,
            col_ok,
            BLOCK_B,
            BLOCK_K,
            BLOCK_OUT,
            ITERS,
            DOT_IN_FP32,
        )
    tokens = tl.arange(0, BLOCK_B)
    valid = (tokens < n_tokens)[:, None] & col_ok[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + tokens[:, None] * n_out + cols[None, :]
        tl.store(out_ptrs, cast_nearest_even(acc, out_ptr.dtype.element_ty), mask=valid)
    else:
        out_ptrs = out_ptr + (split * n_tokens + tokens[:, None]).to(tl.int64) * n_out + cols[None, :]
        tl.store(out_ptrs, acc, mask=valid)


@triton.jit
def _combine_splits_kernel(
    partial_ptr, bias_ptr, y_ptr, n_tokens, n_out, SPLITS: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """y[b, o] = sum over splits s, in order, of partial[s, b, o] (+ bias[o]), cast to y's dtype."""
    token = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(partial_ptr + (s * n_tokens + token).to(tl.int64) * n_out + cols, mask=valid, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * n_out + cols, cast_nearest_even(acc, y_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Host side


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def _plan(n_tokens: int, n_in: int, n_out: int, itemsize: int, device: torch.device, split_k: Optional[int] = None):
    """(BLOCK_K, BLOCK_OUT, splits, chunks per split) for a call: about PROGRAMS_PER_SM programs per SM, each
    at least MIN_CHUNKS chunks of BLOCK_K rows (fewer splits where the input is short)."""
    block_k, block_out = SINGLE_TOKEN_BLOCKS if n_tokens == 1 else BATCH_BLOCKS[itemsize]
    chunks = max(1, triton.cdiv(n_in, block_k))
    if split_k is None:
        wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), triton.cdiv(n_out, block_out))
        split_k = min(wanted, max(1, chunks // MIN_CHUNKS))
    iters = triton.cdiv(chunks, max(1, min(split_k, chunks)))
    return block_k, block_out, triton.cdiv(chunks, iters), iters


def _check(x, mask, weight_t, bias) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"x: [tokens, in] with 1 to {MAX_BATCH} tokens, got {tuple(x.shape)}")
    if x.dtype not in DTYPES or weight_t.dtype != x.dtype:
        raise TypeError(f"x and weight_t: one dtype of fp32, bf16, fp16; got {x.dtype}, {weight_t.dtype}")
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask: bool, shaped like x {tuple(x.shape)}; got {mask.dtype} {tuple(mask.shape)}")
    if weight_t.dim() != 2 or weight_t.shape[0] != x.shape[1] or not weight_t.is_contiguous():
        raise ValueError(f"weight_t: contiguous [in={x.shape[1]}, out], got {tuple(weight_t.shape)}")
    if bias is not None and bias.shape != (weight_t.shape[1],):
        raise ValueError(f"bias: [{weight_t.shape[1]}], got {tuple(bias.shape)}")


def sparse_gemv(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight_t: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``(x ⊙ mask) @ weight_t + bias`` [tokens, out] with fp32 accumulation, reading only the rows of
    ``weight_t`` some token keeps.

    x [tokens, in] (1 to 16 tokens), mask bool [tokens, in] (each token's kept input channels), weight_t [in, out]
    contiguous, in x's dtype (fp32, bf16 or fp16); bias None or [out] (added in fp32). Returns x's dtype, or
    ``out_dtype`` (fp32: the result before the final cast). ``split_k``: input splits (None: sized to the GPU).
    No host synchronisation."""
    _check(x, mask, weight_t, bias)
    n_tokens, n_in = x.shape
    n_out = weight_t.shape[1]
    x, mask = x.contiguous(), mask.contiguous().view(torch.uint8)
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(n_tokens, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if n_out == 0:
        return y
    block_k, block_out, splits, iters = _plan(n_tokens, n_in, n_out, x.element_size(), x.device, split_k)
    single = n_tokens == 1
    partial = y if splits == 1 else torch.empty(splits, n_tokens, n_out, dtype=torch.float32, device=x.device)
    _sparse_gemv_kernel[(triton.cdiv(n_out, block_out), splits)](
        x,
        mask,
        weight_t,
        bias if bias is not None else x,  # never read without HAS_BIAS
        partial,
        n_tokens,
        n_in,
        n_out,
        x.stride(0),
        mask.stride(0),
        BLOCK_B=1 if single else DOT_ROWS,
        BLOCK_K=block_k,
        BLOCK_OUT=block_out,
        ITERS=iters,
        SINGLE_TOKEN=single,
        DOT_IN_FP32=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
        FINAL=splits == 1,
        HAS_BIAS=bias is not None,
        num_warps=4,
        num_stages=3,
    )
    if splits > 1:
        _combine_splits_kernel[(triton.cdiv(n_out, COMBINE_BLOCK), n_tokens)](
            partial,
            bias if bias is not None else partial,
            y,
            n_tokens,
            n_out,
            SPLITS=splits,
            BLOCK=COMBINE_BLOCK,
            HAS_BIAS=bias is not None,
            num_warps=4,
        )
    return y
