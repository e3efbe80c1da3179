"""BitNet b1.58 quantizers: ternary absmean weights (per tensor) and int8 absmax activations (per token).

Both are fake-quantizers for training: they return dequantized values in the input dtype, and the gradient
passes straight through the rounding (STE). The scale (``alpha`` for weights, ``gamma`` per token for
activations) can be supplied by the caller, which is how tensor parallelism reduces it over the whole weight /
the whole row (see ``megatron_qsparse.parallel.sharded_quant``).

On CPU the compiled ops (``megatron_qsparse.kernels``), on CUDA the Triton kernels (``kernels/triton_bitnet.py``)
do each quantizer in one pass over the tensor; torch's route below (the definition, used elsewhere and without a
compiler or Triton) makes ~5 passes. Same values: tested.
"""

from typing import Callable, Optional

import torch

from megatron_qsparse.sparsity.topk import compiled, triton_kernel

EPS = 1e-5
ACT_LEVELS = 127


def abs_sum(w: torch.Tensor) -> torch.Tensor:
    """sum |w| accumulated in fp64 (a 0-d fp64 tensor). fp64, so that a tensor-parallel sum of shard sums
    rounds to the very same fp32 alpha (fp32 sums in another order would differ in the last bit and flip the
    ternary code of weights sitting on a rounding boundary)."""
    w = w.detach()
    kernel = triton_kernel("abs_sum", w)
    if kernel is not None:
        return kernel(w)
    op = compiled("abs_sum", w)
    return op(w.contiguous()) if op is not None else w.abs().sum(dtype=torch.float64)


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """alpha = mean(|W|) over the whole tensor, in fp32 (accumulated in fp64: see ``abs_sum``)."""
    return (abs_sum(w) / w.numel()).float()


def absmax_scale(x: torch.Tensor) -> torch.Tensor:
    """gamma = max(|x|) per token (last dim), in fp32, shape [..., 1]."""
    return x.detach().abs().float().amax(dim=-1, keepdim=True)


class _StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``; backward passes the gradient to x unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor]):
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _ternary_levels(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """RoundClip(W / alpha, -1, 1) in fp32."""
    return (w.detach().float() / alpha).round_().clamp_(-1, 1)


def _ternary(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    kernel = triton_kernel("ternary", w)
    if kernel is not None:
        return kernel(w, alpha)
    op = compiled("ternary", w)
    if op is not None:
        return op(w.contiguous(), alpha)
    return _ternary_levels(w, alpha).mul_(alpha).to(w.dtype)


def _int8(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    # The fused routes take one fp32 gamma per row; a broadcast or lower-precision gamma takes the definition.
    per_row = gamma.numel() * x.shape[-1] == x.numel() and gamma.dtype == torch.float32
    kernel = triton_kernel("int8_levels", x)
    if kernel is not None and per_row:
        return kernel(x, gamma)
    op = compiled("int8_levels", x)
    if op is not None and per_row:
        return op(x.contiguous(), gamma.contiguous())
    levels = (x.float() * (ACT_LEVELS / gamma)).round_().clamp_(-ACT_LEVELS - 1, ACT_LEVELS)
    return levels.mul_(gamma / ACT_LEVELS).to(x.dtype)


def weight_scale(w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ternary scale a BitNet weight is quantized with: ``alpha`` (a tensor-parallel reduction) or mean|W|,
    clamped to EPS."""
    return (absmean_scale(w) if alpha is None else alpha).clamp(min=EPS)


def quantize_weight_ternary(w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``RoundClip(W / alpha, -1, 1) * alpha`` with alpha = mean|W| (clamped to EPS); STE gradient."""
    alpha = weight_scale(w, alpha)
    return _StraightThrough.apply(w, lambda t: _ternary(t, alpha))


def ternary_codes(w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The integer weight codes in {-1, 0, 1} (for export and inspection)."""
    return _ternary_levels(w, weight_scale(w, alpha)).to(torch.int8)


def quantize_activation_int8(x: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``RoundClip(127 x / gamma, -128, 127) * gamma / 127`` per token, gamma = max|x| (clamped); STE."""
    fused = triton_kernel("int8_absmax", x) if gamma is None else None
    if fused is not None:  # the scale and the levels in one pass over each row
        return _StraightThrough.apply(x, fused)
    gamma = (absmax_scale(x) if gamma is None else gamma).clamp(min=EPS)
    return _StraightThrough.apply(x, lambda t: _int8(t, gamma))
