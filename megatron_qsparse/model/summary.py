"""See a model before training it: parameters, block-linear parameters N, activated parameters N_a.

    python -m megatron_qsparse.model.summary --preset mistral-7b \\
        --set sparsity.qkv=0.514 --set sparsity.proj=0.5 --set sparsity.fc1=0.5 --set sparsity.fc2=0.8
"""

import argparse
import json
import sys
from typing import Mapping, Optional

from megatron_qsparse.model.config import PRESETS, QSparseConfig, preset
from megatron_qsparse.sparsity.stats import activated_parameters

# Megatron-LM's factors (megatron/training/training.py, ``num_floating_point_operations``): every GEMM runs three
# times (forward, backward data gradient, backward weight gradient) and an m×n by n×k product is 2mnk FLOPs.
FORWARD_BACKWARD = 3
FMA = 2


def summarize(cfg: QSparseConfig) -> dict:
    ratios = cfg.sparsity.ratios()
    per_site = cfg.block_linear_params()
    n_block = sum(per_site.values())
    _, n_active = activated_parameters(cfg.activated_block_linear_params(), ratios)
    h, layers = cfg.hidden_size, cfg.num_layers
    embedding = cfg.padded_vocab_size * h
    output = 0 if cfg.tie_embeddings else embedding
    norms = (2 * layers + 1) * h
    qkv_bias = layers * (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim if cfg.add_qkv_bias else 0
    router = layers * (cfg.num_experts or 0) * h
    return {
        "total_parameters": n_block + embedding + output + norms + qkv_bias + router,
        "block_linear_parameters_N": n_block,
        "activated_parameters_N_a": n_active,
        "overall_sparsity": 1.0 - n_active / n_block if cfg.num_experts is None else None,
        "site_sparsity": ratios,
        "site_parameters": per_site,
        "block_size": cfg.sparsity.block_size,
        "bitnet": cfg.bitnet,
        "activation": cfg.activation,
        "num_experts": cfg.num_experts,
        "moe_router_topk": cfg.moe_router_topk if cfg.num_experts else None,
    }


def attention_score_flops_per_token(cfg: QSparseConfig, seq_length: Optional[int] = None) -> int:
    """QKᵀ and scores·V of one token, forward and backward, all layers: per layer 3·2·(heads·head_dim)·seq/2·2,
    Megatron-LM's count (the causal mask halves the scores; Megatron-LM before its causal fix counted the full
    square, twice this). No parameters: the same whatever the sparsity."""
    seq = seq_length or cfg.seq_length
    query_size = cfg.num_attention_heads * cfg.head_dim
    # seq / 2 scores per query (causal) times 2 products (QKᵀ, scores·V): Megatron-LM's ``seq / 2 * 2``
    return cfg.num_layers * FORWARD_BACKWARD * FMA * query_size * seq


def logits_flops_per_token(cfg: QSparseConfig) -> int:
    """The output layer hidden -> padded vocabulary (run even when tied to the embedding), never sparsified."""
    return FORWARD_BACKWARD * FMA * cfg.hidden_size * cfg.padded_vocab_size


def model_flops_per_token(cfg: QSparseConfig, seq_length: Optional[int] = None) -> int:
    """Training FLOPs per token as Megatron-LM counts them (``num_floating_point_operations`` over batch·seq,
    MHA/GQA branch): dense projections, causal attention scores, the GLU MLP (gate, up and down: the factor 3) of
    the top-k experts for MoE, and the logits. Norms, biases, the router and the softmax are not counted. This is
    what ``mfu`` reports; sparsity does not lower it."""
    h, layers = cfg.hidden_size, cfg.num_layers
    query_size = cfg.num_attention_heads * cfg.head_dim
    key_value_size = cfg.query_groups * cfg.head_dim
    projections = FORWARD_BACKWARD * FMA * (h * (query_size + 2 * key_value_size) + query_size * h)
    ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    experts_routed_to = cfg.moe_router_topk if cfg.num_experts else 1
    mlp = FORWARD_BACKWARD * FMA * h * ffn * 3 * experts_routed_to
    return layers * (projections + mlp) + attention_score_flops_per_token(cfg, seq_length) + logits_flops_per_token(cfg)


def activated_flops_per_token(
    cfg: QSparseConfig, sparsity: Mapping[str, float], seq_length: Optional[int] = None
) -> float:
    """Ours (``mfu_activated``): the same count with the four block linears at their activated size, 6·N_a at the
    given per-site input sparsity, plus the same attention scores and logits (neither is sparsified). Equal to
    ``model_flops_per_token`` at zero sparsity; the FLOPs a kernel that skips the zeros would need."""
    _, n_active = activated_parameters(cfg.activated_block_linear_params(), sparsity)
    return (
        FORWARD_BACKWARD * FMA * n_active
        + attention_score_flops_per_token(cfg, seq_length)
        + logits_flops_per_token(cfg)
    )


def _billions(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_summary(name: str, s: dict) -> str:
    lines = [
        f"model {name}",
        f"  total parameters                 {_billions(s['total_parameters'])} ({s['total_parameters']:,})",
        f"  block-linear parameters N        {_billions(s['block_linear_parameters_N'])} "
        f"({s['block_linear_parameters_N']:,})",
        f"  activated parameters N_a         {_billions(s['activated_parameters_N_a'])} "
        f"({round(s['activated_parameters_N_a']):,})",
    ]
    if s["overall_sparsity"] is not None:
        lines.append(f"  overall sparsity 1 - N_a/N       {100 * s['overall_sparsity']:.1f}%")
    lines.append("  site   sparsity   parameters")
    for site, ratio in s["site_sparsity"].items():
        lines.append(f"  {site:<6} {100 * ratio:7.1f}%   {_billions(s['site_parameters'][site])}")
    extras = [f"activation={s['activation']}", f"bitnet={s['bitnet']}"]
    if s["block_size"]:
        extras.append(f"block={s['block_size']}")
    if s["num_experts"]:
        extras.append(f"experts={s['num_experts']} top-{s['moe_router_topk']}")
    lines.append("  " + ", ".join(extras))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. sparsity.fc2=0.8 or num_layers=2",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        cfg = preset(args.preset, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    s = summarize(cfg)
    print(json.dumps(s, indent=2) if args.json else format_summary(args.preset, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
