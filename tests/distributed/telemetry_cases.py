"""Realized sparsity recorded by the Q-Sparse linears during a forward pass."""

import torch

from distributed.equivalence import load_global_weights, make_batch, model_config
from megatron_qsparse.layers import realized_sparsity_by_site, record_sparsity
from megatron_qsparse.model.gpt import build_gpt_model
from megatron_qsparse.parallel.state import ParallelLayout, destroy_model_parallel, initialize_model_parallel


def recorded_sparsity(rank, world_size, variant, tp) -> dict:
    cfg = model_config(variant)
    initialize_model_parallel(ParallelLayout(tp=tp))
    try:
        model = build_gpt_model(cfg, cfg.to_transformer_config(tp))
        load_global_weights(model)
        record_sparsity(model)
        tokens = make_batch(cfg)["tokens"]
        with torch.no_grad():
            model(tokens, torch.arange(cfg.seq_length).expand_as(tokens), None)
        return realized_sparsity_by_site(model)
    finally:
        destroy_model_parallel()
