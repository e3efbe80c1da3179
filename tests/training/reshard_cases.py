"""Save a model under one layout, load it under another, compare the logits of the same tokens."""

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_qsparse.model import preset
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import default_init, initialize_weights
from megatron_qsparse.parallel.state import ParallelLayout, destroy_model_parallel, initialize_model_parallel
from megatron_qsparse.training.checkpoint import load_model

MODEL = [
    "num_layers=2",
    "hidden_size=64",
    "ffn_hidden_size=128",
    "num_attention_heads=4",
    "num_query_groups=2",
    "vocab_size=256",
    "seq_length=16",
    "tie_embeddings=false",
    "sparsity.default=0.5",
    "sparsity.fc2=0.8",
]


def _full_logits(model, cfg):
    """Logits of a fixed batch on the last stage, vocabulary shards gathered; None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(9))
    positions = torch.arange(cfg.seq_length).expand(2, -1)

    def forward_step(data_iterator, m):
        return m(next(data_iterator), positions, None), lambda o: (o.sum() * 0, {"logits": o.detach()})

    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=cfg.seq_length,
            micro_batch_size=2,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    shard = reports[0]["logits"]
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def save_under(rank, world_size, layout: ParallelLayout, directory: str):
    from megatron.core import dist_checkpointing

    cfg = preset("tiny", MODEL)
    initialize_model_parallel(layout)
    try:
        model = build_gpt_model(cfg, cfg.to_transformer_config(layout.tp, layout.pp))
        initialize_weights(model, seed=11, init=default_init(0.05, cfg.num_layers))
        (Path(directory) / "model").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(Path(directory) / "model"))
        return _full_logits(model, cfg)
    finally:
        destroy_model_parallel()


def load_under(rank, world_size, layout: ParallelLayout, directory: str):
    cfg = preset("tiny", MODEL)
    initialize_model_parallel(layout)
    try:
        model = build_gpt_model(cfg, cfg.to_transformer_config(layout.tp, layout.pp))
        initialize_weights(model, seed=12, init=default_init(0.05, cfg.num_layers))  # overwritten by the load
        load_model(model, Path(directory))
        return _full_logits(model, cfg)
    finally:
        destroy_model_parallel()


def zero_partition_elements(rank, world_size, zero_stage: int) -> dict:
    """A tiny model's DeepSpeed engine at DP=world_size: this rank's fp32 partition size and the model's size."""
    from megatron_qsparse.training.optimizer import build_engine, init_deepspeed_comm

    cfg = preset("tiny", MODEL)
    initialize_model_parallel(ParallelLayout())
    try:
        init_deepspeed_comm()
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        engine = build_engine(
            model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, clip_grad=1.0, zero_stage=zero_stage,
            micro_batch_size=2, num_microbatches=1,
        )  # fmt: skip
        partition = sum(flat.numel() for flat in engine.optimizer.single_partition_of_fp32_groups)
        return {"partition": partition, "parameters": sum(p.numel() for p in model.parameters())}
    finally:
        destroy_model_parallel()
