"""What a Q-Sparse site does to the input (and, with BitNet, the weight) of one linear projection."""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_qsparse.parallel.sharded_quant import sharded_absmax, sharded_absmean
from megatron_qsparse.parallel.sharded_topk import sharded_sparsity_mask
from megatron_qsparse.sparsity.bitnet import quantize_activation_int8, quantize_weight_ternary
from megatron_qsparse.sparsity.topk import apply_mask, check_sparsity

SITES = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class SiteConfig:
    """One projection's input treatment: top-K (or block N:M) with STE, then optional BitNet b1.58."""

    name: str
    sparsity: float = 0.0
    block_size: Optional[int] = None
    ste: bool = True
    bitnet: bool = False

    def __post_init__(self):
        if self.name not in SITES:
            raise ValueError(f"unknown site {self.name!r}; sites are {SITES}")
        check_sparsity(self.sparsity, f"site {self.name}: sparsity")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"site {self.name}: block_size must be a positive integer, got {self.block_size}")


class SiteTransform:
    """Applies a ``SiteConfig`` inside a linear layer, given the groups its tensors are split over.

    ``row_group``: the group across which the input's last dim is split (RowParallelLinear), else None.
    ``weight_group``: the group across which the weight is split (for BitNet's absmean).
    With ``record`` set it keeps the realized input sparsity of its last call (fraction of zeros in this
    rank's part of the input, natural zeros included) as a tensor, so telemetry costs no sync until read.
    """

    def __init__(self, site: SiteConfig, row_group, weight_group):
        self.site, self.row_group, self.weight_group = site, row_group, weight_group
        self.target_sparsity = site.sparsity  # what a sparsity ramp grows towards
        self.record = False
        self.last_sparsity: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        site = self.site
        if site.sparsity > 0:
            mask = sharded_sparsity_mask(x, site.sparsity, site.block_size, self.row_group)
            x = apply_mask(x, mask, site.ste)
        if self.record:
            self.last_sparsity = (x.detach() == 0).float().mean()
        if site.bitnet:
            x = quantize_activation_int8(x, sharded_absmax(x, self.row_group))
            weight = quantize_weight_ternary(weight, sharded_absmean(weight, self.weight_group))
        return x, weight


def site_transforms(model: torch.nn.Module):
    """(module name, SiteTransform) of every Q-Sparse linear in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "site", None), SiteTransform):
            yield name, module.site


def scale_sparsity(model: torch.nn.Module, fraction: float) -> None:
    """Set every site to ``fraction`` of its target ratio (the continue-training ramp; 1.0 = target)."""
    for _, transform in site_transforms(model):
        transform.site = dataclasses.replace(transform.site, sparsity=transform.target_sparsity * fraction)


def record_sparsity(model: torch.nn.Module, enabled: bool = True) -> None:
    for _, transform in site_transforms(model):
        transform.record = enabled
        transform.last_sparsity = None


def realized_sparsity_by_site(model: torch.nn.Module) -> Dict[str, float]:
    """Mean realized input sparsity per site over this rank's layers (and experts) of the last forward."""
    values: Dict[str, List[torch.Tensor]] = {}
    for _, transform in site_transforms(model):
        if transform.last_sparsity is not None:
            values.setdefault(transform.site.name, []).append(transform.last_sparsity)
    return {site: float(torch.stack(v).mean()) for site, v in values.items()}
