"""Workers for the Hugging Face tests: save variants under a layout, export, and run the megatron model."""

from pathlib import Path

import torch
import torch.distributed as dist
from distributed.equivalence import model_config
from training.reshard_cases import _full_logits

from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.model.init import default_init, initialize_weights
from megatron_qsparse.parallel.state import ParallelLayout, destroy_model_parallel, initialize_model_parallel
from megatron_qsparse.training.checkpoint import STATE_FILE

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))


def save_variants(rank, world_size, cases, root: str) -> dict:
    """Each (variant, layout): a checkpoint directory in our format, and the megatron logits of TOKENS."""
    import json

    from megatron.core import dist_checkpointing

    logits = {}
    for variant, layout in cases:
        cfg = model_config(variant)
        cfg.seq_length = 16
        directory = Path(root) / f"{variant}-{layout}"
        initialize_model_parallel(layout)
        try:
            model = build_gpt_model(cfg, cfg.to_transformer_config(layout.tp, layout.pp, layout.ep, layout.sp))
            initialize_weights(model, seed=5, init=default_init(0.1, cfg.num_layers))
            if rank == 0:
                (directory / "model").mkdir(parents=True)
            dist.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), str(directory / "model"))
            if rank == 0:
                state = {
                    "step": 0,
                    "layout": vars(layout),
                    "world_size": world_size,
                    "config": {"model": dict(cfg.to_dict(), preset="tiny")},
                }
                (directory / STATE_FILE).write_text(json.dumps(state))
            full = _full_logits(model, cfg)
            if full is not None:
                logits[f"{variant}-{layout}"] = full[..., : cfg.vocab_size]
        finally:
            destroy_model_parallel()
    return logits


def export_all(rank, world_size, pairs) -> None:
    from megatron_qsparse.hf.convert import export_checkpoint

    for checkpoint, output in pairs:
        export_checkpoint(Path(checkpoint), Path(output), log=lambda m: None)


def megatron_loss(rank, world_size, checkpoint: str, tokens: torch.Tensor) -> float:
    """Mean next-token loss of a checkpoint's model on ``tokens`` (one process)."""
    from megatron.core import tensor_parallel

    from megatron_qsparse.model.config import QSparseConfig
    from megatron_qsparse.training.checkpoint import load_model, read_trainer_state

    model_dict = dict(read_trainer_state(Path(checkpoint))["config"]["model"])
    model_dict.pop("preset")
    cfg = QSparseConfig.from_dict(model_dict)
    initialize_model_parallel(ParallelLayout())
    try:
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        load_model(model, Path(checkpoint))
        with torch.no_grad():
            logits = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None)
            return float(tensor_parallel.vocab_parallel_cross_entropy(logits.float(), tokens[:, 1:]).mean())
    finally:
        destroy_model_parallel()
