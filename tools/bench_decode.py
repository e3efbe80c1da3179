"""Decode speed of Q-Sparse on this CPU: dense vs sparse projections and decoder layers, batch 1.

    python tools/bench_decode.py           # paper 7B (ReLU² GLU, MHA) and Mistral-7B (SwiGLU, GQA) layers,
                                           # fp32 and bf16, sparsity 0.4 / 0.5 / 0.6 / 0.7 (a few minutes)
    python tools/bench_decode.py --quick   # 7B, fp32, sparsity 0.5 / 0.6, 5 repeats; generate() of a
                                           # 4-layer 300M-shaped model, 16 tokens, 2 repeats (CI smoke)
    python tools/bench_decode.py --generate  # only the whole-model generate() section
    python tools/bench_decode.py --json    # the same as JSON on stdout
    python tools/bench_decode.py --engine  # whole-model decoding: the decode engine against llama.cpp on the
                                           # same weights (tools/bench_engine.py; --engine --help for more)

Per shape, dtype and sparsity s, each projection (qkv, proj, fc1 = gate+up, fc2 = down) and one whole decoder
layer step (``megatron_qsparse.inference.decode_layer``: norms, attention over a KV cache, activation,
residuals and the four projections at s) are timed three ways in one process, taking turns, medians:

  dense-torch   ``F.linear`` on W [out, in] (MKL / oneDNN)
  dense-kernel  the gather kernel reading every row of Wᵀ (the sparse code with nothing skipped)
  sparse        ``SparseDecodeLinear``: the top-K selection (the project's rule) + reading only the kept rows

Before every timed call a 128 MiB read (4x the L3 here) evicts the caches, as streaming a whole model per token would.
``speedup`` = min(dense-torch, dense-kernel) / sparse: against the faster dense route, so that a slow BLAS path
cannot inflate it; ``vs-torch`` = dense-torch / sparse. ``of-limit`` = speedup · (1 - s): the fraction reached
of the memory-bound limit 1 / (1 - s). ``rows`` is the fraction of Wᵀ's rows a call reads (the union over the
batch for ``--batch`` > 1). Inputs and weights are random (weights N(0, 1/in)).

Whole model (``--generate`` runs only this section, ``--no-generate`` skips it; both run by default): tokens/s of
greedy ``generate()`` of the Hugging Face model (``megatron_qsparse.hf``) with random weights in the paper's 300M
shape (24 layers, hidden 1024, 16 heads, ReLU²-GLU 2730, vocab 32000, untied LM head; ``--gen-layers`` changes the
depth), a fixed prompt of ``--prompt-tokens`` (32) and exactly ``--new-tokens`` (64) new tokens (``min_new_tokens``
too, so every run decodes the same count), KV cache on, the same weights three ways, taking turns, medians of
``--gen-repeats`` (3):

  dense    the model at sparsity 0 (F.linear everywhere)
  masked   Q-Sparse at s on all four sites, the default path: ``F.linear(topk_sparsify(x), W)``
  kernel   the same at s with ``generate(..., use_sparse_kernel=True)``: every call of ≤ 64 tokens (the prompt
           and each decode step) through ``topk_linear``, reading only the kept rows of Wᵀ

tokens/s = new tokens / wall time of the whole call (prefill included). dense and masked run on one copy of the
weights in the usual [out, in] layout, kernel on a second copy that its first call re-lays out input-major.
``agree``: how many of the first new tokens masked and kernel share. Their logits differ only by the summation
order (fp32: ~1e-6 of the largest), but random weights give near-tied logits and a chaotic model: one flipped
pick and the rest of the text differs. (bf16: the masked path itself is as far from its own fp32 computation.)
"""

import argparse
import sys
import warnings
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")  # megatron-core's notices about apex / TransformerEngine

import copy  # noqa: E402

import torch  # noqa: E402
from bench_timing import CacheEvictor, interleaved_medians, machine, machine_line, print_report  # noqa: E402

from megatron_qsparse import kernels  # noqa: E402
from megatron_qsparse.hf.convert import hf_config_from  # noqa: E402
from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM, SiteLinear  # noqa: E402
from megatron_qsparse.inference import SparseDecodeLinear, backend  # noqa: E402
from megatron_qsparse.inference.decode_layer import (  # noqa: E402
    DecodeLayer,
    LayerShape,
    dense_projections,
    random_weights,
    sparse_projections,
)
from megatron_qsparse.model import preset  # noqa: E402

SHAPES = {"7b": "7b", "mistral-7b": "mistral-7b"}  # bench name -> model preset
DTYPES = kernels.DTYPES
GOALS = {0.5: 1.8, 0.6: 2.2}  # per-layer speedup the issue asks for at these sparsities
GENERATE_PRESET = "300m"  # the whole-model section's shape


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="store_true", help="the engine against llama.cpp (bench_engine.py)")
    parser.add_argument("--quick", action="store_true", help="7b, fp32, s = 0.5 / 0.6, 5 repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["7b", "mistral-7b"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--batch", type=int, default=1, help="tokens per step (default 1)")
    parser.add_argument("--kv-cache", type=int, default=128, help="cached positions attended to (default 128)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--generate", action="store_true", help="only the whole-model generate() section")
    parser.add_argument("--no-generate", action="store_true", help="skip the whole-model generate() section")
    parser.add_argument("--gen-layers", type=int, default=24, help="layers of the 300M-shaped model (default 24)")
    parser.add_argument("--gen-sparsities", nargs="+", type=float, default=[0.5, 0.6])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generate() calls per variant")
    args = parser.parse_args(argv)
    if args.generate and args.no_generate:
        parser.error("--generate and --no-generate exclude each other")
    if args.quick:
        args.shapes, args.dtypes, args.sparsities, args.warmup, args.repeats = ["7b"], ["fp32"], [0.5, 0.6], 2, 5
        args.gen_layers, args.new_tokens, args.gen_repeats = 4, 16, 2
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def speedups(times: Dict[str, float], sparsity: float) -> dict:
    speedup = min(times["dense-torch"], times["dense-kernel"]) / times["sparse"]
    return {
        "dense_torch_ms": times["dense-torch"],
        "dense_kernel_ms": times["dense-kernel"],
        "sparse_ms": times["sparse"],
        "speedup": speedup,
        "speedup_vs_torch": times["dense-torch"] / times["sparse"],
        "limit": 1.0 / (1.0 - sparsity),
        "of_limit": speedup * (1.0 - sparsity),
    }


def bench_shape_dtype(shape_name: str, dtype_name: str, args) -> List[dict]:
    """Rows of results (projections, then the layer) for every sparsity of one shape and dtype."""
    shape = LayerShape.from_config(preset(SHAPES[shape_name]))
    dtype = DTYPES[dtype_name]
    progress(f"{shape_name} {dtype_name}: building weights {shape}")
    weights = random_weights(shape, dtype)
    dense = dense_projections(weights)
    sparse = sparse_projections(weights, 0.0)
    # The same stored Wᵀ, read whole: the gather kernel's own dense baseline.
    kernel_dense = {site: SparseDecodeLinear(m.weight_t, 0.0, input_major=True) for site, m in sparse.items()}
    layers = {
        name: DecodeLayer(shape, projections, args.batch, args.kv_cache, dtype)
        for name, projections in (("dense-torch", dense), ("dense-kernel", kernel_dense), ("sparse", sparse))
    }
    generator = torch.Generator().manual_seed(2)
    inputs = {
        site: torch.randn(args.batch, fan_in, generator=generator).to(dtype)
        for site, (fan_in, _) in shape.projection_sizes().items()
    }
    hidden = torch.randn(args.batch, shape.hidden, generator=generator).to(dtype)
    evict = CacheEvictor()
    rows = []
    for sparsity in args.sparsities:
        progress(f"{shape_name} {dtype_name}: sparsity {sparsity}")
        for module in sparse.values():
            module.set_sparsity(sparsity)
        for site, x in inputs.items():
            calls = {
                "dense-torch": lambda site=site, x=x: dense[site](x),
                "dense-kernel": lambda site=site, x=x: kernel_dense[site](x),
                "sparse": lambda site=site, x=x: sparse[site](x),
            }
            fan_in, fan_out = shape.projection_sizes()[site]
            row = {
                "shape": shape_name,
                "dtype": dtype_name,
                "sparsity": sparsity,
                "part": site,
                "in": fan_in,
                "out": fan_out,
                "rows_read": sparse[site].kept_rows(x).numel() / fan_in,
            }
            row.update(speedups(interleaved_medians(calls, args.warmup, args.repeats, evict), sparsity))
            rows.append(row)
        calls = {name: (lambda layer=layer: layer(hidden)) for name, layer in layers.items()}
        row = {
            "shape": shape_name,
            "dtype": dtype_name,
            "sparsity": sparsity,
            "part": "layer",
            "in": shape.hidden,
            "out": shape.hidden,
            "rows_read": None,
        }
        row.update(speedups(interleaved_medians(calls, args.warmup, args.repeats, evict), sparsity))
        rows.append(row)
    return rows


def generate_model(dtype: torch.dtype, layers: int) -> QSparseForCausalLM:
    """The Hugging Face model in the paper's 300M shape (``layers`` deep), random weights, dense until
    ``set_site_sparsity``."""
    torch.manual_seed(0)
    config = hf_config_from(preset(GENERATE_PRESET, [f"num_layers={layers}"]))
    return QSparseForCausalLM(config).to(dtype).eval()


def set_site_sparsity(model: QSparseForCausalLM, sparsity: float) -> None:
    """The same ratio at all four sites of every layer (cheap: the weights are untouched)."""
    model.config.sparsity = {site: sparsity for site in model.config.sparsity}
    for module in model.modules():
        if isinstance(module, SiteLinear):
            module.sparsity = sparsity


def generate_calls(
    models: Dict[str, QSparseForCausalLM], sparsity: float, prompt: torch.Tensor, new_tokens: int, outputs: dict
) -> dict:
    """One greedy generate() of exactly ``new_tokens`` per variant; each call stores its ids in ``outputs``."""
    variants = {
        "dense": (models["natural"], 0.0, False),
        "masked": (models["natural"], sparsity, False),
        "kernel": (models["kernel"], sparsity, True),
    }

    def call(name, model, ratio, kernel):
        set_site_sparsity(model, ratio)
        outputs[name] = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            use_sparse_kernel=kernel,
        )

    return {name: (lambda name=name, v=v: call(name, *v)) for name, v in variants.items()}


def bench_generate_dtype(dtype_name: str, args) -> List[dict]:
    """Rows (one per sparsity) of generate() tokens/s: dense, masked and kernel, interleaved."""
    progress(f"generate {dtype_name}: building the {GENERATE_PRESET}-shaped model ({args.gen_layers} layers)")
    natural = generate_model(DTYPES[dtype_name], args.gen_layers)
    models = {"natural": natural, "kernel": copy.deepcopy(natural)}
    prompt = torch.randint(
        0, natural.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(3)
    )
    rows = []
    for sparsity in args.gen_sparsities:
        progress(f"generate {dtype_name}: sparsity {sparsity}")
        outputs = {}
        for warm in generate_calls(models, sparsity, prompt, 2, outputs).values():
            warm()  # compiles the kernel, re-lays out the kernel copy's weights
        times = interleaved_medians(
            generate_calls(models, sparsity, prompt, args.new_tokens, outputs), 0, args.gen_repeats
        )
        rate = {name: args.new_tokens / (ms / 1e3) for name, ms in times.items()}
        rows.append(
            {
                "dtype": dtype_name,
                "sparsity": sparsity,
                "dense_tokens_per_s": rate["dense"],
                "masked_tokens_per_s": rate["masked"],
                "kernel_tokens_per_s": rate["kernel"],
                "kernel_vs_dense": rate["kernel"] / rate["dense"],
                "kernel_vs_masked": rate["kernel"] / rate["masked"],
                "agreeing_tokens": agreeing_prefix(outputs["masked"], outputs["kernel"], args.prompt_tokens),
            }
        )
    return rows


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor, prompt_tokens: int) -> int:
    """How many of the first new tokens two greedy generations share."""
    differ = (a[0, prompt_tokens:] != b[0, prompt_tokens:]).nonzero()
    return int(differ[0]) if differ.numel() else a.shape[1] - prompt_tokens


def goal_checks(rows: List[dict]) -> List[dict]:
    checks = []
    for row in rows:
        goal = GOALS.get(row["sparsity"])
        if row["part"] == "layer" and goal is not None:
            checks.append(
                {
                    "shape": row["shape"],
                    "dtype": row["dtype"],
                    "sparsity": row["sparsity"],
                    "goal": goal,
                    "speedup": row["speedup"],
                    "met": row["speedup"] >= goal,
                }
            )
    return checks


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"{machine_line(m)}; gather kernel: {report['config']['backend']}")
    if report["results"]:
        print_layer_table(report)
    if "generate" in report:
        print_generate_table(report["generate"])


def print_generate_table(section: dict) -> None:
    c = section["config"]
    print(
        f"\ngenerate(): {c['shape']}, {c['layers']} layers; prompt {c['prompt_tokens']}, {c['new_tokens']} new "
        f"tokens, greedy, KV cache; median of {c['repeats']} interleaved calls (tokens/s)"
    )
    header = (
        f"{'dtype':<6}{'s':>5}{'dense':>9}{'masked':>9}{'kernel':>9}{'kernel/dense':>14}{'kernel/masked':>15}"
        f"{'agree':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in section["results"]:
        print(
            f"{r['dtype']:<6}{r['sparsity']:>5.2f}{r['dense_tokens_per_s']:>9.2f}{r['masked_tokens_per_s']:>9.2f}"
            f"{r['kernel_tokens_per_s']:>9.2f}{r['kernel_vs_dense']:>13.2f}x{r['kernel_vs_masked']:>14.2f}x"
            f"{r['agreeing_tokens']:>8}"
        )


def print_layer_table(report: dict) -> None:
    c = report["config"]
    print(
        f"batch {c['batch']}; KV cache {c['kv_cache']}; "
        f"median of {c['repeats']} interleaved calls after {c['warmup']} warmup"
    )
    for name, shape in c["shapes"].items():
        print(f"shape {name}: {shape}")
    header = (
        f"{'shape':<11}{'dtype':<6}{'s':>5}  {'part':<6}{'in→out':>13}{'rows':>6}{'dense-torch':>13}"
        f"{'dense-kernel':>13}{'sparse':>10}{'speedup':>9}{'vs-torch':>9}{'limit':>7}{'of-limit':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        rows = "" if r["rows_read"] is None else f"{r['rows_read']:.2f}"
        print(
            f"{r['shape']:<11}{r['dtype']:<6}{r['sparsity']:>5.2f}  {r['part']:<6}"
            f"{str(r['in']) + '→' + str(r['out']):>13}"
            f"{rows:>6}{r['dense_torch_ms']:>10.2f} ms{r['dense_kernel_ms']:>10.2f} ms{r['sparse_ms']:>7.2f} ms"
            f"{r['speedup']:>8.2f}x{r['speedup_vs_torch']:>8.2f}x{r['limit']:>7.2f}{r['of_limit']:>9.2f}"
        )
    for g in report["goals"]:
        verdict = "met" if g["met"] else "NOT met"
        print(
            f"goal {g['shape']} {g['dtype']} layer at s={g['sparsity']}: ≥ {g['goal']}x, "
            f"measured {g['speedup']:.3f}x: {verdict}"
        )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--engine" in argv:
        import bench_engine

        return bench_engine.main(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "machine": machine(),
        "config": {
            "backend": backend(),
            "batch": args.batch,
            "kv_cache": args.kv_cache,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "dtypes": args.dtypes,
            "sparsities": args.sparsities,
            "shapes": {name: LayerShape.from_config(preset(SHAPES[name])).__dict__ for name in args.shapes},
        },
        "results": [],
    }
    if not args.generate:
        for shape_name in args.shapes:
            for dtype_name in args.dtypes:
                report["results"] += bench_shape_dtype(shape_name, dtype_name, args)
    report["goals"] = goal_checks(report["results"])
    if not args.no_generate:
        report["generate"] = {
            "config": {
                "shape": GENERATE_PRESET,
                "layers": args.gen_layers,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "repeats": args.gen_repeats,
                "sparsities": args.gen_sparsities,
                "dtypes": args.dtypes,
            },
            "results": [row for dtype_name in args.dtypes for row in bench_generate_dtype(dtype_name, args)],
        }
    return print_report(report, args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
