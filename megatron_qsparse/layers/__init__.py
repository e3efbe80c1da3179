"""Q-Sparse layers built on megatron-core's tensor-parallel modules."""

from megatron_qsparse.layers.linear import QSparseColumnParallelLinear, QSparseRowParallelLinear
from megatron_qsparse.layers.norm import Norm
from megatron_qsparse.layers.site import (
    SITES,
    SiteConfig,
    SiteTransform,
    realized_sparsity_by_site,
    record_sparsity,
    scale_sparsity,
    site_transforms,
)
