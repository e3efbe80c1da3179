"""One global batch through megatron-core's schedule (any PP layout, interleaved or not, with microbatches), and
its loss."""

from typing import Callable, Dict, List, Optional

import torch

from megatron_qsparse.model.gpt import model_chunks
from megatron_qsparse.parallel.host_collectives import all_reduce_host


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens the mask keeps; logits are this rank's vocabulary shard."""
    from megatron.core import tensor_parallel

    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def forward_backward(
    call: Callable,
    module,
    batches: List[Dict[str, torch.Tensor]],
    seq_length: int,
    forward_only: bool = False,
    loss_fn: Callable = None,
) -> Optional[torch.Tensor]:
    """Run ``batches`` (this rank's microbatches) through the schedule; ``call(tokens, position_ids)`` is the
    forward (the DeepSpeed engine in training, so that its backward hooks see the outputs), with ``chunk=c``
    for a model of several chunks (``ModelChunks``: interleaved 1F1B). Gradients accumulate, already averaged
    over microbatches. Returns the mean loss on the last stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    loss_fn = loss_fn or lm_loss
    micro = batches[0]["tokens"].shape[0]
    device = next(module.parameters()).device  # the data loader's CPU tensors go where the model is
    positions = torch.arange(seq_length, device=device).expand(micro, -1)
    chunks = model_chunks(module)
    interleaved = len(chunks) > 1

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        which = {"chunk": next(i for i, c in enumerate(chunks) if c is chunk)} if interleaved else {}
        output = call(batch["tokens"], positions, **which)

        def loss_func(logits):
            loss = loss_fn(logits, batch["labels"], batch["loss_mask"])
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks] if interleaved else iter(batches),  # one pass per chunk
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.stack([r["loss"] for r in reports]).mean()


def global_mean_loss(local_loss: Optional[torch.Tensor]) -> float:
    """The loss averaged over data-parallel ranks, known on every rank (NaN anywhere gives NaN everywhere).
    Contributors: the last pipeline stage's tensor-parallel rank 0 of each data-parallel replica."""
    from megatron.core import parallel_state as ps

    contributes = local_loss is not None and ps.get_tensor_model_parallel_rank() == 0
    total = torch.tensor([float(local_loss) if contributes else 0.0, 1.0 if contributes else 0.0], dtype=torch.float64)
    total = all_reduce_host(total)
    return float(total[0] / total[1])
