"""The compiled decode kernel: top-K selection and ``(x ⊙ mask) @ Wᵀ`` reading only the kept rows of Wᵀ.

``weight_t`` is an input-major weight Wᵀ [in, out]. For each token of ``x`` [batch, in] the op selects the
top-k channels (of the whole row, or of each block for Block Q-Sparse) by the project's rule, then reads the union
of the tokens' kept rows, each row once for the whole batch, accumulating in fp32. At batch 1 with sparsity s that
is a fraction ``1 - s`` of the weight bytes. ``SparseDecodeLinear`` (sparse_linear.py) is the user-facing API.

The op is ``torch.ops.qsparse.topk_linear`` of the project's compiled CPU ops (``megatron_qsparse.kernels``,
source ``kernels/qsparse_cpu.cpp``, built on first use). Where it cannot be built, or with ``QSPARSE_KERNELS=0``,
the torch route of sparse_linear.py takes over (``topk_mask`` + ``index_select`` of the kept rows + ``mm``):
exact, slower. ``backend()`` says which one runs.

Why a kernel (fp32 / bf16, 4096→12288 at 50%, batch 1, 1 thread, on the 2-core AMD EPYC dev box):
``index_select`` + ``mm`` 82 / 223 ms (it copies the rows before reading them again), ``torch.sparse.mm`` with a
COO input 7.4 / 11.3 ms (and accumulates bf16 in bf16: 10% error), dense ``F.linear`` 10.5 / 5.6 ms, the gather
4.2 / 2.5 ms (its own dense, all rows: 8.4 / 5.2 ms). Why the selection is in it too: once a projection's weights
have streamed through the caches, each of the ~15 small torch ops of a Python-side selection and gather costs
tens of microseconds; one op instead saves 0.3-0.6 ms per projection (4096→4096 bf16: 1.29 → 0.80 ms). Its
selection is the one the training forward uses on CPU (a bucket histogram, then nth_element on one bucket).
"""

import functools
from typing import Callable, Optional

import torch

from megatron_qsparse import kernels

# kMaxBatch in the source. Beyond a few dozen tokens (prefill) the union is ~all rows and a BLAS matmul wins
# (measured: 2x faster at 256 tokens, fp32).
MAX_KERNEL_BATCH = 64


@functools.lru_cache(maxsize=None)
def load_kernel() -> Optional[Callable]:
    """The compiled ``topk_linear`` op; None where the project's CPU ops cannot be built."""
    ops = kernels.load()
    return None if ops is None else ops.topk_linear


backend = kernels.backend


def kernel_applies(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether the compiled op takes this call (else the torch route of sparse_linear.py does)."""
    return (
        load_kernel() is not None
        and weight_t.device.type == "cpu"
        and weight_t.dtype in kernels.DTYPES.values()
        and x.dtype in kernels.DTYPES.values()
        and 1 <= x.shape[0] <= MAX_KERNEL_BATCH
    )


def compiled_topk_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    segment: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x ⊙ M) @ weight_t + bias`` in x's dtype for ``x`` [batch, in], M the top-``k`` of every ``segment``
    channels of each row, by one call of the compiled op (``kernel_applies`` first). A bool ``mask`` shaped
    like x, if given, receives M."""
    return load_kernel()(x.contiguous(), weight_t, bias, k, segment, mask)
