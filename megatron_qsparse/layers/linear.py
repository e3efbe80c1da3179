"""megatron-core's tensor-parallel linears with a Q-Sparse site applied to their input.

The site runs inside ``_forward_impl``, i.e. on exactly the tensor each rank multiplies: for a
ColumnParallelLinear the full hidden row of its local tokens (before the sequence-parallel all-gather), for a
RowParallelLinear its shard of the row, where the top-K is computed globally over the tensor-parallel group.
"""

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_qsparse.layers.site import SiteConfig, SiteTransform
from megatron_qsparse.parallel.sharded_topk import check_block_fits_shard


class _SiteOnInput:
    """Mixin: transform (input, weight) by the site before megatron-core's matmul and communication."""

    def _attach_site(self, site: SiteConfig, row_group) -> None:
        if site.bitnet and self.config.gradient_accumulation_fusion:
            raise ValueError(
                "BitNet quantizes the weight on the fly, which gradient_accumulation_fusion cannot accumulate "
                "into: set gradient_accumulation_fusion=False"
            )
        self.site = SiteTransform(site, row_group=row_group, weight_group=self.tp_group)

    def _forward_impl(self, input, weight, *args, **kwargs):
        input, weight = self.site(input, weight)
        return super()._forward_impl(input, weight, *args, **kwargs)


class QSparseColumnParallelLinear(_SiteOnInput, ColumnParallelLinear):
    """Column-parallel linear (qkv, fc1): the input row is whole on every rank, so top-K is local."""

    def __init__(self, *args, site: SiteConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_site(site, row_group=None)


class QSparseRowParallelLinear(_SiteOnInput, RowParallelLinear):
    """Row-parallel linear (proj, fc2): the input row is split over the TP group; top-K is global."""

    def __init__(self, *args, site: SiteConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if site.block_size:
            check_block_fits_shard(self.input_size_per_partition, site.block_size, self.tp_group.size(), site.name)
        self._attach_site(site, row_group=self.tp_group)
