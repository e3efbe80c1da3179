"""BitNet b1.58 quantizers: ternary absmean weights (per tensor) and int8 absmax activations (per token).

Both are fake-quantizers for training: they return dequantized values in the input dtype, and the gradient
passes straight through the rounding (``x + (q(x) - x).detach()``). The scale (``alpha`` for weights, ``gamma``
per token for activations) can be supplied by the caller, which is how tensor parallelism reduces it over the
whole weight / the whole row (see ``megatron_qsparse.parallel.sharded_quant``).
"""

from typing import Optional

import torch

EPS = 1e-5
ACT_LEVELS = 127


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """alpha = mean(|W|) over the whole tensor. Accumulated in fp64 and returned in fp32, so that a
    tensor-parallel sum of shard sums gives the very same alpha (fp32 sums in another order would differ in the
    last bit and flip the ternary code of weights sitting on a rounding boundary)."""
    return (w.detach().abs().sum(dtype=torch.float64) / w.numel()).float()


def absmax_scale(x: torch.Tensor) -> torch.Tensor:
    """gamma = max(|x|) per token (last dim), in fp32, shape [..., 1]."""
    return x.detach().abs().float().amax(dim=-1, keepdim=True)


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return x + (quantized.to(x.dtype) - x).detach()


def _ternary(w: torch.Tensor, alpha: Optional[torch.Tensor]):
    alpha = (absmean_scale(w) if alpha is None else alpha).clamp(min=EPS)
    return (w.detach().float() / alpha).round().clamp(-1, 1), alpha


def quantize_weight_ternary(w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``RoundClip(W / alpha, -1, 1) * alpha`` with alpha = mean|W| (clamped to EPS); STE gradient."""
    codes, alpha = _ternary(w, alpha)
    return _straight_through(w, codes * alpha)


def ternary_codes(w: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The integer weight codes in {-1, 0, 1} (for export and inspection)."""
    return _ternary(w, alpha)[0].to(torch.int8)


def quantize_activation_int8(x: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``RoundClip(127 x / gamma, -128, 127) * gamma / 127`` per token, gamma = max|x| (clamped); STE."""
    gamma = (absmax_scale(x) if gamma is None else gamma).clamp(min=EPS)
    levels = (x.detach().float() * (ACT_LEVELS / gamma)).round().clamp(-ACT_LEVELS - 1, ACT_LEVELS)
    return _straight_through(x, levels * (gamma / ACT_LEVELS))
