"""Run one model variant under one parallel layout and compare it with the single-process run.

Every layout initializes from the same global model: each tensor of ``sharded_state_dict()`` is a slice of a
full tensor seeded by its global key. The reference (TP=PP=EP=1, whole batch) runs in the same processes
afterwards, and each rank compares its own slices of the loss, logits and gradients against it.
"""

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_qsparse.model import preset
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import global_slice, initialize_weights, sharded_tensors
from megatron_qsparse.parallel.state import ParallelLayout, destroy_model_parallel, initialize_model_parallel
from megatron_qsparse.sparsity.bitnet import absmax_scale, absmean_scale

# Small enough for 2 CPU cores, large enough that TP shards, GQA, blocks of 32 and top-2 of 4 experts matter.
TINY = [
    "num_layers=2",
    "hidden_size=64",
    "ffn_hidden_size=128",
    "num_attention_heads=4",
    "num_query_groups=2",
    "vocab_size=256",
    "seq_length=32",
    "tie_embeddings=false",
]
VARIANTS = {
    "dense": [],
    "qsparse": ["sparsity.default=0.5", "sparsity.fc2=0.8"],
    "block": ["sparsity.default=0.5", "sparsity.block_size=32"],
    "bitnet": ["bitnet=true", "sparsity.default=0.5"],
    "moe": ["num_experts=4", "moe_router_topk=2", "sparsity.default=0.5", "sparsity.fc2=0.8"],
    "tied-layernorm": ["tie_embeddings=true", "normalization=layernorm", "sparsity.default=0.5"],
}
GLOBAL_BATCH, MICROBATCHES = 8, 4


def model_config(variant: str):
    return preset("tiny", TINY + VARIANTS[variant])


def seeded_full_tensor(key: str, shape, generator) -> torch.Tensor:
    # Norm weights away from 1 so that their gradients and sharding are exercised too.
    if "layernorm" in key:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)


def load_global_weights(model) -> None:
    initialize_weights(model, seed=0, init=seeded_full_tensor)


def make_batch(cfg) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    seq = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1), generator=g)
    return {"tokens": seq[:, :-1], "labels": seq[:, 1:]}


def reduce_gradients(model, layout: ParallelLayout, dp_size: int) -> None:
    """What megatron's DDP + finalize_model_grads do, spelled out: sequence-parallel params sum over TP,
    dense params average over DP, expert params sum over expert-DP and divide by DP."""
    from megatron.core import parallel_state as ps

    for p in model.parameters():
        if p.grad is None:
            continue
        if layout.sp and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        expert = not getattr(p, "allreduce", True)
        group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        p.grad /= dp_size


@dataclass
class RunResult:
    loss: float  # NaN off the last stage
    logits: torch.Tensor  # this rank's slice
    logits_index: Tuple[slice, slice, slice]
    grads: List[Tuple[str, Tuple[slice, ...], torch.Tensor]]


def run(cfg, layout: ParallelLayout, whole_batch: bool = False) -> RunResult:
    """Forward+backward of one global batch with megatron-core's schedule for the layout."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    initialize_model_parallel(layout)
    try:
        tc = cfg.to_transformer_config(layout.tp, layout.pp, layout.ep, layout.sp)
        model = build_gpt_model(cfg, tc)
        load_global_weights(model)
        batch = make_batch(cfg)
        dp_rank, dp_size = (0, 1) if whole_batch else (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        rows = GLOBAL_BATCH // dp_size
        mb = rows // MICROBATCHES
        start = dp_rank * rows
        positions = torch.arange(cfg.seq_length).expand(mb, -1)
        microbatches = [
            {k: v[start + i * mb : start + (i + 1) * mb] for k, v in batch.items()} for i in range(MICROBATCHES)
        ]
        logits_out, losses = [], []

        def loss_func(labels, output):
            loss = tensor_parallel.vocab_parallel_cross_entropy(output.float(), labels).mean()
            logits_out.append(output.detach().clone())
            losses.append(loss.detach().clone())  # the schedule divides `loss` in place
            return loss, {"lm loss": loss.detach()}

        def forward_step(data_iterator, model):
            item = next(data_iterator)
            return model(item["tokens"], positions, None), partial(loss_func, item["labels"])

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=MICROBATCHES,
            seq_length=cfg.seq_length,
            micro_batch_size=mb,
            forward_only=False,
        )
        if not whole_batch:
            reduce_gradients(model, layout, dp_size)

        loss = float("nan")
        logits, index = torch.empty(0), (slice(0), slice(0), slice(0))
        if ps.is_pipeline_last_stage():
            local = torch.stack(losses).mean()
            if dp_size > 1:
                dist.all_reduce(local, group=ps.get_data_parallel_group())
                local /= dp_size
            loss = float(local)
            logits = torch.cat(logits_out)
            vocab = logits.shape[-1]
            tp_rank = 0 if whole_batch else ps.get_tensor_model_parallel_rank()
            index = (slice(start, start + rows), slice(None), slice(tp_rank * vocab, (tp_rank + 1) * vocab))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        grads = [(st.key, global_slice(st), st.data.detach().clone()) for st in sharded_tensors(model)]
        return RunResult(loss, logits, index, grads)
    finally:
        destroy_model_parallel()


def assemble(grads) -> Dict[str, torch.Tensor]:
    """Full tensors from the reference's slices (layer-stacked keys come one layer per slice)."""
    shapes: Dict[str, List[int]] = {}
    for key, index, _ in grads:
        ends = [s.stop for s in index]
        shapes[key] = [max(a, b) for a, b in zip(shapes.get(key, ends), ends)]
    full = {key: torch.zeros(shape) for key, shape in shapes.items()}
    for key, index, data in grads:
        full[key][index] = data.reshape(full[key][index].shape)
    return full


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0


def compare_layout(rank, world_size, variant: str, layout: ParallelLayout) -> dict:
    cfg = model_config(variant)
    sharded = run(cfg, layout)
    ref = run(cfg, ParallelLayout(), whole_batch=True)
    ref_grads = assemble(ref.grads)
    grad_errors, grad_norm_errors = {}, {}
    for key, index, data in sharded.grads:
        expected = ref_grads[key][index].reshape(data.shape)
        grad_errors[key] = max(grad_errors.get(key, 0.0), relative_error(data, expected))
        norm_error = float((data - expected).norm() / expected.norm().clamp(min=1e-12))
        grad_norm_errors[key] = max(grad_norm_errors.get(key, 0.0), norm_error)
    result = {
        "grad_rel": max(grad_errors.values()),
        "grad_keys": sorted(grad_errors),
        "ref_keys": sorted(ref_grads),
        "worst_grad": max(grad_errors, key=grad_errors.get),
        "grad_norm_rel": max(grad_norm_errors.values()),
    }
    if sharded.logits.numel():
        expected = ref.logits[sharded.logits_index]
        result["loss"], result["ref_loss"] = sharded.loss, ref.loss
        result["loss_rel"] = abs(sharded.loss - ref.loss) / abs(ref.loss)
        result["logits_rel"] = relative_error(sharded.logits, expected)
        per_token = (sharded.logits - expected).abs().amax(-1) / expected.abs().max()
        result["tokens_matching"] = float((per_token <= 1e-4).float().mean())
    return result


def per_shard_topk_mask(x_local, sparsity, block_size, group):
    """The approximation an exact implementation must not be: top-(k/TP) of each shard independently."""
    from megatron_qsparse.sparsity.topk import block_topk_mask, kept_count, topk_mask

    if block_size:
        return block_topk_mask(x_local, sparsity, block_size)
    return topk_mask(x_local, kept_count(sparsity, x_local.shape[-1]))


# Negative controls: replace one exact piece with its shard-local approximation; the comparison must fail.
APPROXIMATIONS = {
    "per-shard-topk": {"sharded_sparsity_mask": per_shard_topk_mask},
    "local-bitnet-scales": {
        "sharded_absmax": lambda x, group: absmax_scale(x),
        "sharded_absmean": lambda w, group: absmean_scale(w),
    },
}


def compare_layouts(rank, world_size, cases, approximate_cases=()) -> dict:
    """Several (variant, layout) cases in one launch (process start-up dominates on CPU), then the
    ``approximate_cases`` ``(approximation, variant, layout)`` under an approximation from APPROXIMATIONS."""
    from megatron_qsparse.layers import site

    results = {f"{v}-{l}": compare_layout(rank, world_size, v, l) for v, l in cases}
    for name, v, l in approximate_cases:
        saved = {attr: getattr(site, attr) for attr in APPROXIMATIONS[name]}
        for attr, replacement in APPROXIMATIONS[name].items():
            setattr(site, attr, replacement)
        try:
            results[f"{name}:{v}-{l}"] = compare_layout(rank, world_size, v, l)
        finally:
            for attr, original in saved.items():
                setattr(site, attr, original)
    return results
