"""Q-Sparse layers built on megatron-core's tensor-parallel modules."""

from megatron_qsparse.layers.linear import QSparseColumnParallelLinear, QSparseRowParallelLinear
from megatron_qsparse.layers.norm import RMSNorm
from megatron_qsparse.layers.site import SITES, SiteConfig, SiteTransform
