"""Triton kernels of BitNet b1.58's fake quantizers: the GPU routes of ``megatron_qsparse.sparsity.bitnet``.

Each function reproduces the torch definition there operation for operation, in fp32, so the values are the
same bit for bit (tested in the interpreter: ``tests/unit/test_triton_bitnet.py``):

- ``abs_sum(w)``: sum |w| in fp64. Two stages: every program sums a fixed chunk of ``CHUNK`` entries into fp64
  lanes and writes one fp64 partial; torch then adds the partials (one small reduction on the device). The
  order is fixed by the shapes, so the value is deterministic; fp64 makes ``(abs_sum / numel).float()`` the
  fp32 alpha of any other fp64 summation order but for ties astronomically rare.
- ``ternary(w, alpha)``: ``(w.float() / alpha).round_().clamp_(-1, 1).mul_(alpha).to(w.dtype)``.
- ``int8_levels(x, gamma)``: ``(x.float() * (127 / gamma)).round_().clamp_(-128, 127).mul_(gamma / 127)``, one
  gamma per row.
- ``int8_absmax(x)``: ``int8_levels(x, max|x|.clamp(min=EPS))`` with the per-row absmax in the same kernel (one
  program per row; the row is read once when it fits in registers, twice (the second time from L2) when not).

Exactness, operation by operation:

- Division. Triton's ``/`` on fp32 is the GPU's approximate division (``div.full.f32``, 2 ulp); the torch
  routes divide exactly, so every division here is ``tl.math.div_rn`` (IEEE round-to-nearest, ``div.rn.f32``;
  numpy's division in the interpreter).
- ``127 / gamma``. A Python scalar divided by a tensor is ``Tensor.__rtruediv__``, i.e. ``gamma.reciprocal() *
  127``: two roundings (``fl(fl(1 / gamma) * 127)``), which differs from ``fl(127 / gamma)`` in a quarter of the
  cases. Reproduced as such.
- ``gamma / 127``. torch on CPU divides; torch on CUDA multiplies by the fp32 reciprocal of a CPU scalar
  divisor (``gamma * fl(1 / 127)``, ``div_true_kernel_cuda``), which differs from the division in the last bit
  for ~4% of gammas. The kernels follow the torch of the device they run on (``scale_by_reciprocal``: True on
  CUDA), so each equals the definition it replaces; both arithmetics are tested in the interpreter.
- Rounding. torch rounds half to even (``nearbyint``). ``libdevice.rint`` would do, but the interpreter runs no
  extern (libdevice) calls, so ``_round_half_even`` rounds in integers: truncate, compare the exact fraction with
  0.5, break ties to the even neighbour, and give the result the sign of its input (``round(-0.3) = -0.0``, as
  torch). No float identity a compiler could simplify (``(v + 1.5 * 2**23) - 1.5 * 2**23``) and no multiply
  feeding an add (which ``fma`` contraction would fuse, skipping a rounding) is involved.
- Clamp before rounding. Clamping to integer bounds commutes with rounding, so each kernel clamps first (the
  integer rounding then only sees |v| <= 128) with NaN-propagating min / max (``max.NaN.f32``): NaN stays NaN, as
  torch's ``clamp``; +-inf clamp to the bounds, as ``round`` then ``clamp`` do.
- Absmax. torch's ``amax`` returns NaN for a row holding one; GPU max-reductions drop NaNs, so the kernel
  reduces the non-NaN magnitudes and counts the NaNs separately.
- Casts. fp32 -> bf16 / fp16 stores round to nearest even, as torch's ``.to``.

Inputs: fp32, bf16 or fp16 tensors on any device Triton runs on (CUDA, or CPU under ``TRITON_INTERPRET=1``);
outputs on the same device, in the input's dtype (``abs_sum``: a 0-d fp64 tensor). alpha / gamma are fp32
tensors read by the kernels: nothing synchronises with the host. A non-contiguous input is read through its
strides when it flattens to a [rows, d] view, else copied once (``reshape``); outputs are contiguous.
"""

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-5  # megatron_qsparse.sparsity.bitnet.EPS: the smallest activation scale
CHUNK = 1 << 16  # entries per abs_sum program (its fp64 partial)
SUM_BLOCK = 4096  # entries per abs_sum load
ELEMENTWISE_BLOCK = 4096  # entries per ternary program; int8_levels: per program along a row
MAX_ROW_TILE = 16384  # int8_absmax: longest row held in registers (one read of the row)
LONG_ROW_BLOCK = 4096  # longer rows: chunks of this size, the row read twice

ACT_MAX: tl.constexpr = tl.constexpr(127.0)
ACT_MIN: tl.constexpr = tl.constexpr(-128.0)
EPS_F32: tl.constexpr = tl.constexpr(EPS)  # a Python float constant becomes fp32 by round-to-nearest, as clamp's
INV_ACT_MAX: tl.constexpr = tl.constexpr(1.0 / 127)  # torch CUDA's fp32 reciprocal of the divisor 127
SIGN_BIT: tl.constexpr = tl.constexpr(0x80000000)
ABS_BITS: tl.constexpr = tl.constexpr(0x7FFFFFFF)
BF16_HALF: tl.constexpr = tl.constexpr(0x7FFF)  # half a bf16 ulp in fp32 bits, less one (ties: the low bit decides)
BF16_NAN: tl.constexpr = tl.constexpr(0x7FC0)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _clamp_keeping_nan(v, lo, hi):
    """clamp(v, lo, hi) with NaN staying NaN (torch's clamp)."""
    v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_half_even(v):
    """torch.round of fp32 ``v`` with |v| < 2**31: nearest integer, ties to even, sign kept (-0.3 -> -0.0);
    NaN stays NaN."""
    is_nan = v != v
    whole = tl.where(is_nan, 0.0, v).to(tl.int32)  # toward zero
    fraction = tl.abs(v - whole.to(tl.float32))  # exact: v and its integer part share the exponent range
    odd = (whole & 1) != 0
    away = (fraction > 0.5) | ((fraction == 0.5) & odd)
    magnitude = tl.abs(whole.to(tl.float32)) + tl.where(away, 1.0, 0.0)
    bits = (magnitude.to(tl.uint32, bitcast=True) & ABS_BITS) | (v.to(tl.uint32, bitcast=True) & SIGN_BIT)
    return tl.where(is_nan, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast_nearest_even(v, dtype: tl.constexpr):
    """fp32 ``v`` in ``dtype``, rounded to nearest even like torch's ``.to``. bf16 by hand: the interpreter's
    fp32 -> bf16 cast truncates (the GPU's ``cvt.rn.bf16.f32`` rounds), so the rounding is done on the bits, the
    same on both; NaN becomes torch's bf16 NaN (0x7FC0). fp16 and fp32: the cast (both round to nearest even)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (BF16_HALF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(v != v, BF16_NAN, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _int8_round_clip_scale(x, gamma, SCALE_BY_RECIPROCAL: tl.constexpr):
    """RoundClip(x * (127 / gamma), -128, 127) * (gamma / 127) in fp32, with torch's roundings (module doc)."""
    by = tl.math.div_rn(1.0, gamma) * ACT_MAX  # 127 / gamma = gamma.reciprocal() * 127
    if SCALE_BY_RECIPROCAL:
        scale = gamma * INV_ACT_MAX  # torch on CUDA
    else:
        scale = tl.math.div_rn(gamma, ACT_MAX)  # torch on CPU
    levels = _round_half_even(_clamp_keeping_nan(x.to(tl.float32) * by, ACT_MIN, ACT_MAX))
    return levels * scale


@triton.jit
def _absmax_keeping_nan(magnitudes):
    """max of a 1-D block of |x| (>= 0), NaN if any is NaN (torch's amax)."""
    is_nan = magnitudes != magnitudes
    largest = tl.max(tl.where(is_nan, 0.0, magnitudes), axis=0)
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    return tl.where(any_nan, float("nan"), largest)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _abs_sum_partials_kernel(w_ptr, partial_ptr, n, BLOCK: tl.constexpr, LOADS: tl.constexpr):
    """partial[p] = sum |w| over entries [p * BLOCK * LOADS, (p + 1) * BLOCK * LOADS) in fp64."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (BLOCK * LOADS)
    lanes = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(LOADS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(w_ptr + offs, mask=offs < n, other=0.0)
        lanes += tl.abs(v.to(tl.float32)).to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(lanes, axis=0))


@triton.jit
def _ternary_kernel(w_ptr, alpha_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    alpha = tl.load(alpha_ptr)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    levels = _round_half_even(_clamp_keeping_nan(tl.math.div_rn(w, alpha), -1.0, 1.0))
    tl.store(out_ptr + offs, cast_nearest_even(levels * alpha, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _int8_levels_kernel(
    x_ptr, gamma_ptr, out_ptr, d, stride_row, stride_col, BLOCK: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr
):
    """Grid (rows, blocks along the row): enough programs whatever the row count."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < d
    gamma = tl.load(gamma_ptr + row)
    x = tl.load(x_ptr + row * stride_row + cols * stride_col, mask=valid, other=0.0)
    y = _int8_round_clip_scale(x, gamma, SCALE_BY_RECIPROCAL)
    tl.store(out_ptr + row * d + cols, cast_nearest_even(y, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _int8_absmax_kernel(
    x_ptr,
    out_ptr,
    d,
    stride_row,
    stride_col,
    BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
):
    """One program per row: gamma = max|x|.clamp(min=EPS), then the int8 levels of the row (``CHUNKS`` blocks of
    ``BLOCK`` entries; a constant trip count, as the interpreter's loops need)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_row
    out_row = out_ptr + row * d
    cols = tl.arange(0, BLOCK)
    if CHUNKS == 1:  # the row in registers: read once
        valid = cols < d
        x = tl.load(x_row + cols * stride_col, mask=valid, other=0.0).to(tl.float32)
        gamma = tl.maximum(_absmax_keeping_nan(tl.abs(x)), EPS_F32, propagate_nan=tl.PropagateNan.ALL)
        y = _int8_round_clip_scale(x, gamma, SCALE_BY_RECIPROCAL)
        tl.store(out_row + cols, cast_nearest_even(y, out_ptr.dtype.element_ty), mask=valid)
    else:  # a long row: the absmax over chunks, then the levels over the same chunks (re-read from L2)
        running = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, CHUNKS * BLOCK, BLOCK):
            offs = start + cols
            x = tl.load(x_row + offs * stride_col, mask=offs < d, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        gamma = tl.maximum(_absmax_keeping_nan(running), EPS_F32, propagate_nan=tl.PropagateNan.ALL)
        for start in range(0, CHUNKS * BLOCK, BLOCK):
            offs = start + cols
            valid = offs < d
            x = tl.load(x_row + offs * stride_col, mask=valid, other=0.0)
            y = _int8_round_clip_scale(x, gamma, SCALE_BY_RECIPROCAL)
            tl.store(out_row + offs, cast_nearest_even(y, out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Host side


def _check_input(t: torch.Tensor, name: str) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: float32, bfloat16 or float16, not {t.dtype}")


def _scale_tensor(scale: torch.Tensor, like: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """``scale`` as a contiguous fp32 vector of ``count`` entries on ``like``'s device (no host sync)."""
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}: float32 (the torch route computes in fp32 only then), not {scale.dtype}")
    if scale.numel() != count:
        raise ValueError(f"{name}: {count} value(s) expected, got {scale.numel()}")
    return scale.detach().to(like.device).reshape(count).contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, d] (a view where its strides allow, else a copy)."""
    d = x.shape[-1] if x.dim() else 1
    return x.reshape(-1, d)


def _warps(block: int) -> int:
    return min(16, max(4, block // 1024))


def _next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def abs_sum(w: torch.Tensor) -> torch.Tensor:
    """sum |w| over the whole tensor, accumulated in fp64: a 0-d fp64 tensor on w's device."""
    _check_input(w, "w")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    loads = CHUNK // SUM_BLOCK
    partial = torch.empty(triton.cdiv(n, CHUNK), dtype=torch.float64, device=w.device)
    _abs_sum_partials_kernel[(partial.numel(),)](flat, partial, n, BLOCK=SUM_BLOCK, LOADS=loads, num_warps=8)
    return partial.sum()


def ternary(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """RoundClip(w / alpha, -1, 1) * alpha in w's dtype (alpha: a one-element fp32 tensor)."""
    _check_input(w, "w")
    alpha = _scale_tensor(alpha, w, 1, "alpha")
    flat = w.detach().reshape(-1)
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    n = flat.numel()
    if n:
        grid = (triton.cdiv(n, ELEMENTWISE_BLOCK),)
        _ternary_kernel[grid](flat, alpha, out, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=8)
    return out


def int8_levels(x: torch.Tensor, gamma: torch.Tensor, *, scale_by_reciprocal=None) -> torch.Tensor:
    """RoundClip(x * (127 / gamma), -128, 127) * (gamma / 127) in x's dtype, gamma fp32 [..., 1] (one per row).

    ``scale_by_reciprocal``: compute ``gamma / 127`` as ``gamma * fl(1 / 127)`` (torch on CUDA) rather than by
    division (torch on CPU); None: as torch does on x's device."""
    _check_input(x, "x")
    rows = _rows(x.detach())
    gamma = _scale_tensor(gamma, x, rows.shape[0], "gamma (one per row)")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        block = min(_next_power_of_2(rows.shape[1]), ELEMENTWISE_BLOCK)
        grid = (rows.shape[0], triton.cdiv(rows.shape[1], block))
        _int8_levels_kernel[grid](
            rows,
            gamma,
            out,
            rows.shape[1],
            rows.stride(0),
            rows.stride(1),
            BLOCK=block,
            SCALE_BY_RECIPROCAL=_by_reciprocal(x, scale_by_reciprocal),
            num_warps=_warps(block),
        )
    return out


def int8_absmax(x: torch.Tensor, *, scale_by_reciprocal=None, max_tile: int = MAX_ROW_TILE) -> torch.Tensor:
    """``int8_levels(x, max|x|.clamp(min=EPS))`` per row (last dim), the absmax in the same kernel.

    ``max_tile``: the longest row held in registers (tests pass a small one to run the long-row loop)."""
    _check_input(x, "x")
    rows = _rows(x.detach())
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        d = rows.shape[1]
        one_tile = _next_power_of_2(d) <= max_tile
        block = _next_power_of_2(d) if one_tile else min(LONG_ROW_BLOCK, max_tile)
        _int8_absmax_kernel[(rows.shape[0],)](
            rows,
            out,
            d,
            rows.stride(0),
            rows.stride(1),
            BLOCK=block,
            CHUNKS=triton.cdiv(d, block),
            SCALE_BY_RECIPROCAL=_by_reciprocal(x, scale_by_reciprocal),
            num_warps=_warps(block),
        )
    return out


def _by_reciprocal(x: torch.Tensor, requested) -> bool:
    return x.device.type == "cuda" if requested is None else bool(requested)
