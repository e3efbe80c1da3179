"""Q-Sparse linear for decoding: read only the rows of Wᵀ that the top-K mask keeps.

``SparseDecodeLinear(weight, sparsity, block_size)`` computes ``topk_sparsify(x, sparsity, block_size) @ weight.T
(+ bias)``: each token keeps its top-K input channels by the project's rule (``megatron_qsparse.sparsity.topk``),
and the product reads only the kept rows of the input-major weight ``weight_t`` [in, out] (stored once, at
construction). At batch 1 that is a fraction ``1 - s`` of the weight bytes: the memory-bound limit of the speedup
is ``1 / (1 - s)``. For finite inputs the result equals the masked dense product (a dropped NaN or inf would make
``x ⊙ mask`` NaN there, while its row is simply not read here).

Three routes, the same selection and product. On CUDA, the Triton GEMV (``kernels/triton_decode.py``, up to 16
tokens, weight in x's dtype) after the Triton top-K mask: one pass over the weight with the dropped rows'
loads predicated off, no gathered copy. On CPU, the compiled kernel (``gather_kernel``: selection, gather and
product in one op, fp32/bf16, up to ``MAX_KERNEL_BATCH`` tokens; its C++ selection is tested equal to
``topk_mask`` / ``block_topk_mask``), else torch (``topk_mask`` + ``index_select`` + ``mm``).

Batch > 1 (choice, measured with ``tools/bench_decode.py --batch``): the rows read are the union of the tokens'
kept channels, each read once and applied to every token (a token that did not keep a channel multiplies it by
zero). Reading per token instead would cost ``batch · (1 - s)`` of the weight, always at least the union.
Independent random masks at 50% make the union 75% of the rows at batch 2 and ~94% at batch 4; Block Q-Sparse
(N:M) fixes the count per block for each token but not which channels, so its union grows the same way: block
masks only change the selection here, not the product.
"""

from typing import Optional, Tuple

import torch

from megatron_qsparse.inference.gather_kernel import compiled_topk_linear, kernel_applies
from megatron_qsparse.sparsity.topk import block_topk_mask, check_sparsity, kept_count, topk_mask, triton_kernel

TRITON_MAX_BATCH = 16  # the Triton GEMV's tokens per call (its tensor-core tile's rows)


def kept_channel_mask(x: torch.Tensor, sparsity: float, block_size: Optional[int] = None) -> torch.Tensor:
    """The top-K (or block N:M) mask of each row of ``x`` [tokens, in], as ``topk_sparsify`` applies it."""
    if check_sparsity(sparsity) == 0:
        return torch.ones_like(x, dtype=torch.bool)
    if block_size:
        return block_topk_mask(x, sparsity, block_size)
    return topk_mask(x, kept_count(sparsity, x.shape[-1]))


def gather_inputs(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rows``: the channels any token keeps (ascending); ``values`` [tokens, len(rows)]: the fp32 inputs
    there, zero where a token did not keep the channel."""
    rows = mask.any(0).nonzero().squeeze(1)
    return rows, x[:, rows].float() * mask[:, rows]


def triton_topk_linear(x, weight_t, bias, sparsity, block_size=None) -> Optional[torch.Tensor]:
    """The Triton route of ``topk_linear`` where it applies (CUDA, at most 16 tokens, weight in x's dtype), else
    None."""
    gemv = triton_kernel("sparse_gemv", x)
    if gemv is None or x.shape[0] > TRITON_MAX_BATCH or weight_t.dtype != x.dtype:
        return None
    return gemv(x, kept_channel_mask(x, sparsity, block_size), weight_t, bias)


def topk_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: Optional[torch.Tensor],
    sparsity: float,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """``topk_sparsify(x, sparsity, block_size) @ weight_t + bias`` in x's dtype (fp32 accumulation) for ``x``
    [tokens, in] and ``weight_t`` [in, out], reading only the rows of ``weight_t`` some token keeps."""
    check_sparsity(sparsity)
    y = triton_topk_linear(x, weight_t, bias, sparsity, block_size)
    if y is not None:
        return y
    if kernel_applies(x, weight_t):
        segment = block_size or x.shape[-1]
        bias = None if bias is None else bias.float()
        return compiled_topk_linear(x, weight_t, bias, kept_count(sparsity, segment), segment)
    rows, values = gather_inputs(x, kept_channel_mask(x, sparsity, block_size))
    y = values @ weight_t.index_select(0, rows).float()
    return (y if bias is None else y + bias).to(x.dtype)


class SparseDecodeLinear(torch.nn.Module):
    """``y = topk_sparsify(x, sparsity, block_size) @ weight.T + bias``, reading only the kept rows of Wᵀ.

    ``weight`` is [out, in] as in ``nn.Linear`` (fp32 or bf16); it is stored transposed, contiguous per input
    channel. ``x`` is [..., in] in any dtype; the product accumulates in fp32 and returns x's dtype.
    Inference only: no gradient flows.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        sparsity: float,
        block_size: Optional[int] = None,
        bias: Optional[torch.Tensor] = None,
        *,
        input_major: bool = False,
    ):
        """``input_major=True``: ``weight`` already is a contiguous Wᵀ [in, out], stored as is (shared)."""
        super().__init__()
        weight_t = weight.detach() if input_major else weight.detach().t().contiguous()
        if not weight_t.is_contiguous():
            raise ValueError("an input-major weight must be contiguous")
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.set_sparsity(sparsity, block_size)

    def set_sparsity(self, sparsity: float, block_size: Optional[int] = None) -> None:
        """Change the ratio (a sweep, a ramp) without touching the stored weight."""
        check_sparsity(sparsity)
        if block_size and self.in_features % block_size:
            raise ValueError(f"block_size={block_size} does not divide the input size {self.in_features}")
        self.sparsity, self.block_size = sparsity, block_size
        segment = block_size or self.in_features
        self._kernel_k_segment = (kept_count(sparsity, segment), segment)  # the compiled op's selection arguments

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, sparsity: float, block_size: Optional[int] = None
    ) -> "SparseDecodeLinear":
        return cls(linear.weight, sparsity, block_size, linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def kept_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of Wᵀ a call on ``x`` reads (the union over its tokens), ascending."""
        tokens = x.detach().reshape(-1, self.in_features)
        return kept_channel_mask(tokens, self.sparsity, self.block_size).any(0).nonzero().squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At decode, with the caches cold from the weights streaming by, every Python-level call costs 5-20 us
        # (measured: 50-75 us per projection through topk_linear's checks): the selection arguments are kept.
        tokens = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if tokens.requires_grad:
            tokens = tokens.detach()
        if kernel_applies(tokens, self.weight_t):
            y = compiled_topk_linear(tokens, self.weight_t, self.bias, *self._kernel_k_segment)
        else:  # CUDA (the Triton route) or the torch route
            y = topk_linear(tokens, self.weight_t, self.bias, self.sparsity, self.block_size)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return f"in={self.in_features}, out={self.out_features}, sparsity={self.sparsity}{block}"
