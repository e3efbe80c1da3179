"""Training-step cost of Q-Sparse on this CPU: one decoder layer, forward + backward, against dense.

    python tools/bench_train_overhead.py          # paper 300M and 1.3B layers, 4 x 256 tokens, fp32
    python tools/bench_train_overhead.py --quick  # 300M layer, 2 x 128 tokens, 3 repeats (CI smoke)
    python tools/bench_train_overhead.py --json   # the same as JSON on stdout

The layer is the project's own: a one-layer megatron-core GPT built from ``preset(...)`` with
``build_gpt_model`` in a single-process gloo group, and its ``decoder`` (the transformer block with RoPE, no
embedding or LM head) runs forward and backward on random hidden states. Variants, all on the same shape and
initial weights: dense; Q-Sparse 50% at the four sites; Block Q-Sparse 16:32; BitNet b1.58 alone; BitNet +
Q-Sparse 50%. The paper's GLU sizes (2730, 5460) are not multiples of 32, which Block Q-Sparse needs at fc2, so
every variant uses the next multiple (2752, 5472). Times are medians of interleaved steps; ratios are to dense.
"""

import argparse
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's fused ops would compile for seconds on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")  # megatron-core's notices about apex / TransformerEngine

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_timing import interleaved_medians, machine, machine_line, print_report  # noqa: E402

from megatron_qsparse.model import preset  # noqa: E402
from megatron_qsparse.model.gpt import build_gpt_model  # noqa: E402
from megatron_qsparse.parallel import cpu_compat  # noqa: E402
from megatron_qsparse.parallel.ports import free_port  # noqa: E402
from megatron_qsparse.parallel.state import ParallelLayout, destroy_model_parallel, initialize_model_parallel  # noqa: E402

SHAPES = ("300m", "1.3b")
BLOCK = 32
VARIANTS = {
    "dense": [],
    "qsparse-50%": ["sparsity.default=0.5"],
    "block-16:32": ["sparsity.default=0.5", f"sparsity.block_size={BLOCK}"],
    "bitnet": ["bitnet=true"],
    "bitnet+qsparse-50%": ["bitnet=true", "sparsity.default=0.5"],
}
GOALS = {"qsparse-50%": 1.10, "bitnet+qsparse-50%": 1.25}  # at most this many times the dense step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300m, 2 x 128 tokens, 3 repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.micro_batch, args.seq, args.warmup, args.repeats = ["300m"], 2, 128, 1, 3
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def block_multiple(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def layer_config(shape: str, variant: str, seq: int):
    ffn = block_multiple(preset(shape).ffn_hidden_size)
    return preset(shape, ["num_layers=1", f"seq_length={seq}", f"ffn_hidden_size={ffn}"] + VARIANTS[variant])


def training_step(shape: str, variant: str, micro_batch: int, seq: int) -> Callable[[], None]:
    """A closure running forward + backward of the variant's decoder block on fixed random hidden states."""
    cfg = layer_config(shape, variant, seq)
    torch.manual_seed(0)  # the same initial weights for every variant
    model = build_gpt_model(cfg, cfg.to_transformer_config())
    decoder, rotary = model.decoder, model.rotary_pos_emb(seq)
    hidden = torch.randn(
        seq, micro_batch, cfg.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True
    )

    def step() -> None:
        out = decoder(hidden, attention_mask=None, rotary_pos_emb=rotary)
        out.float().pow(2).mean().backward()
        decoder.zero_grad(set_to_none=True)
        hidden.grad = None

    return step


def bench_shape(shape: str, args) -> List[dict]:
    progress(f"{shape}: building {len(VARIANTS)} one-layer models")
    steps: Dict[str, Callable[[], None]] = {v: training_step(shape, v, args.micro_batch, args.seq) for v in VARIANTS}
    progress(f"{shape}: timing")
    times = interleaved_medians(steps, args.warmup, args.repeats)
    cfg = layer_config(shape, "dense", args.seq)
    return [
        {
            "shape": shape,
            "hidden": cfg.hidden_size,
            "ffn": cfg.ffn_hidden_size,
            "heads": cfg.num_attention_heads,
            "variant": v,
            "step_ms": ms,
            "vs_dense": ms / times["dense"],
            "goal": GOALS.get(v),
        }
        for v, ms in times.items()
    ]


def single_process_group() -> None:
    cpu_compat.apply()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=120)
    )
    initialize_model_parallel(ParallelLayout())


def print_table(report: dict) -> None:
    m, c = report["machine"], report["config"]
    print(machine_line(m))
    print(
        f"one decoder layer, forward + backward, fp32, {c['micro_batch']} x {c['seq']} tokens; "
        f"median of {c['repeats']} interleaved steps after {c['warmup']} warmup"
    )
    header = f"{'shape':<7}{'hidden':>7}{'ffn':>6}{'heads':>6}  {'variant':<20}{'step':>12}{'vs dense':>10}  goal"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        goal = "" if r["goal"] is None else f"≤ {r['goal']:.2f}x: {'met' if r['vs_dense'] <= r['goal'] else 'NOT met'}"
        print(
            f"{r['shape']:<7}{r['hidden']:>7}{r['ffn']:>6}{r['heads']:>6}  {r['variant']:<20}"
            f"{r['step_ms']:>9.1f} ms{r['vs_dense']:>9.2f}x  {goal}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "machine": machine(),
        "config": {
            "micro_batch": args.micro_batch,
            "seq": args.seq,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "dtype": "fp32",
            "variants": VARIANTS,
        },
        "results": [],
    }
    single_process_group()
    try:
        for shape in args.shapes:
            report["results"] += bench_shape(shape, args)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
    return print_report(report, args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
