"""See a model before training it: parameters, block-linear parameters N, activated parameters N_a.

    python -m megatron_qsparse.model.summary --preset mistral-7b \\
        --set sparsity.qkv=0.514 --set sparsity.proj=0.5 --set sparsity.fc1=0.5 --set sparsity.fc2=0.8
"""

import argparse
import json
import sys

from megatron_qsparse.model.config import PRESETS, QSparseConfig, preset
from megatron_qsparse.sparsity.stats import activated_parameters


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
