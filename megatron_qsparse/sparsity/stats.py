"""Accounting: realized sparsity of a tensor and activated parameters N_a over the block linears."""

from typing import Mapping, Tuple

import torch


def realized_sparsity(x: torch.Tensor) -> float:
    """Fraction of exact zeros in x (masked entries plus natural zeros such as ReLU²'s)."""
    return float((x == 0).sum()) / max(x.numel(), 1)


def activated_parameters(
    params_per_site: Mapping[str, int], sparsity_per_site: Mapping[str, float]
) -> Tuple[int, float]:
    """``N = Σ |W_site|`` and ``N_a = Σ (1 - s_site)·|W_site|``; sites absent from the ratios count as dense."""
    total = sum(params_per_site.values())
    active = sum(n * (1.0 - sparsity_per_site.get(site, 0.0)) for site, n in params_per_site.items())
    return total, active
