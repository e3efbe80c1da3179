"""Tied embeddings under pipeline parallelism: the word-embedding matrix held twice, kept one tensor.

With ``share_embeddings_and_output_weights`` and PP > 1, megatron-core's ``GPTModel`` gives the first stage the
word embedding and the last stage a second parameter of the same shape as its output layer weight
(``LanguageModule.setup_embeddings_and_output_layer``). Both are one weight of the one-process model, so:

- they start equal: :func:`tie_embedding_copies` broadcasts the first stage's values to the last stage over
  megatron-core's embedding group (first and last stage of each pipeline; under TP, the matching vocabulary
  shards). ``model/init.py`` already draws both from the same global key (the last stage's entry in
  ``sharded_state_dict()`` is keyed ``embedding.word_embeddings.weight``), so the broadcast is a guarantee rather
  than a repair; it also marks the last stage's copy ``ds_pipe_replicated`` so that DeepSpeed's global
  gradient norm counts the tied weight once, as the one-process run does.
- every update is the same: :func:`allreduce_tied_embedding_grads` sums the two gradients over the embedding
  group before ``engine.step()``, so each copy gets the one-process gradient (embedding part + output part) and
  Adam, weight decay and clipping do the same elementwise arithmetic on both.

Where the gradient lives: megatron-core's schedule runs backward outside DeepSpeed, and under ZeRO-1 (the only
stage allowed with PP) DeepSpeed reduces nothing until ``engine.step()``, so after the schedule the accumulated
gradient sits in ``param.grad`` (fp32 and bf16 alike; measured with this DeepSpeed). Where DeepSpeed accumulates
in a separate higher-precision ``grad_accum`` attribute instead, that is the tensor it will reduce, and the one
summed here. The sum is in place: DeepSpeed may hold references to these tensors.
"""

from typing import Optional

import torch
import torch.distributed as dist


def _embedding_group():
    """megatron-core's embedding group when this rank holds one of two tied copies, else None."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return None
    group = ps.get_embedding_group()
    return group if dist.get_world_size(group) > 1 else None


def _tied_chunk(model):
    """The model chunk that holds this stage's copy of a word-embedding matrix tied across pipeline stages (the
    first chunk of the first stage, the last chunk of the last), or None (untied, PP = 1, or a middle stage)."""
    if _embedding_group() is None:
        return None
    for chunk in model if isinstance(model, torch.nn.ModuleList) else [model]:  # ModelChunks under interleaving
        if getattr(chunk, "share_embeddings_and_output_weights", False) and (chunk.pre_process or chunk.post_process):
            return chunk
    return None


def tied_embedding_copy(model) -> Optional[torch.nn.Parameter]:
    """This stage's copy of a word-embedding matrix tied across pipeline stages, or None."""
    chunk = _tied_chunk(model)
    return None if chunk is None else chunk.shared_embedding_or_output_weight()


@torch.no_grad()
def tie_embedding_copies(model) -> None:
    """Collective over the embedding group: make the last stage's copy equal the first stage's (after the
    weights are initialized or loaded, before the optimizer copies them) and count it once in the gradient
    norm. A no-op where nothing is tied across stages."""
    chunk = _tied_chunk(model)
    if chunk is None:
        return
    from megatron.core import parallel_state as ps

    weight = chunk.shared_embedding_or_output_weight()
    dist.broadcast(weight.data, src=ps.get_pipeline_model_parallel_first_rank(), group=_embedding_group())
    if not chunk.pre_process:
        weight.ds_pipe_replicated = True  # DeepSpeed's norm skips it: the first stage's copy counts


def _accumulated_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "grad_accum", None)  # DeepSpeed's fp32 accumulation of low-precision gradients
    grad = param.grad if grad is None else grad
    if grad is None:
        raise RuntimeError(
            "the tied word embedding has no accumulated gradient before the optimizer step; the exchange over "
            "the pipeline's embedding group needs it unreduced (ZeRO-1 keeps it in param.grad until the step)"
        )
    return grad


@torch.no_grad()
def allreduce_tied_embedding_grads(model) -> None:
    """Collective over the embedding group: sum the tied copies' gradients, after the whole global batch's
    backward and before the optimizer step (and its data-parallel reduction). A no-op where nothing is tied
    across stages."""
    weight = tied_embedding_copy(model)
    if weight is not None:
        dist.all_reduce(_accumulated_grad(weight), group=_embedding_group())
