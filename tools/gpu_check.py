"""The GPU acceptance run: the Triton routes against torch on CUDA tensors, one-GPU training steps at the 1.3B
shape through the trainer, and the sparse decode GEMV at the 7B shapes. One table (or ``--json``), exit 0.

    python tools/gpu_check.py                       # all three sections, at most ~8 minutes on one H100/H200
    python tools/gpu_check.py --json --out r.json   # the report as JSON on stdout, and into a file
    python tools/gpu_check.py --sections kernels decode
    python tools/gpu_check.py --smoke               # tiny shapes, a few seconds; also runs on CPU (the
                                                    # Triton interpreter), which is how CI keeps it working

Sections:

1. ``kernels``: every Triton route (``megatron_qsparse/kernels/triton_*.py``) on CUDA tensors at the 1.3B
   training shapes (8192 tokens x 2048 and x 5472, bf16 and fp32) against its torch route (``QSPARSE_TRITON=0``):
   masks and quantizers must be bit-equal, the decode GEMV within 1e-5 of max|y| (fp32 sums in another order);
   milliseconds of both and the speedup.
2. ``train``: the trainer (``megatron_qsparse.training.Trainer``: megatron-core model, DeepSpeed ZeRO-2, AdamW)
   on one GPU, bf16, the paper's 1.3B shape (24 layers, hidden 2048, GLU 5472 = 5460 rounded up to a multiple of
   32 for Block 16:32, sequence 2048, micro batch 4, 2 microbatches: 16,384 tokens a step) for dense, Q-Sparse
   50%, Block Q-Sparse 16:32 and BitNet b1.58 + Q-Sparse 50%, each in a process of its own on the shipped
   corpus slice (``tests/data/corpus_slice.jsonl``, tokenized here). Reported: median step time, tokens/s, MFU
   counted as Megatron-LM counts it (all parameters and attention, not N_a; the peak is the card's dense bf16
   989 TFLOP/s), the ratio to dense, and top-K's share of the step: the selections of one step (4 sites x 24
   layers x 2 microbatches, forward only: the STE backward reuses the mask) timed alone on tensors of the sites'
   shapes, over the step time.
3. ``decode``: the Triton sparse GEMV (top-K selection included) against cuBLAS's dense GEMV (``x @ Wᵀ``) at
   the 7B projections (4096 -> 12288 QKV, 4096 -> 4096 out, 4096 -> 11008 x 2 gate/up, 11008 -> 4096 down),
   bf16, sparsity 0.4-0.7, batch 1 and 4, and the memory-bound limit ``1 / (1 - s)`` at batch 1.

Goals (issue 12), printed beside the numbers: Q-Sparse 50% step <= 1.10x dense, BitNet + Q-Sparse <= 1.25x,
dense MFU >= 40%, decode GEMV >= 1.7x at 50% and >= 2.1x at 60% (batch 1, top-K included).

On this workplace's GPU machine (Python 3.12 with torch 2.11, triton 3.6, transformers and tokenizers; no
network; megatron-core and DeepSpeed missing). Once, on the development machine, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl megatron-core==0.16.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \\
        annotated-types==0.8.0 typing-inspection==0.4.5
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # sdist only

Then the device tool's run, with ``carry: [".whl"]`` and ``timeout_s: 600``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 || exit; \\
        python3 tools/gpu_check.py --out $OUT/gpu_check.json
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

SECTIONS = ("kernels", "train", "decode")
VARIANTS = {  # explicit: the base config (tiny-cpu.yaml) sets sparsity 0.5
    "dense": ["model.sparsity.default=0"],
    "qsparse-50%": ["model.sparsity.default=0.5"],
    "block-16:32": ["model.sparsity.default=0.5", "model.sparsity.block_size=32"],
    "bitnet+qsparse-50%": ["model.bitnet=true", "model.sparsity.default=0.5"],
}
STEP_GOALS = {"qsparse-50%": 1.10, "bitnet+qsparse-50%": 1.25}  # at most this many times the dense step
DENSE_MFU_GOAL = 0.40
DECODE_GOALS = {0.5: 1.7, 0.6: 2.1}  # batch 1, top-K included
DECODE_SHAPES = {"qkv": (4096, 12288), "proj": (4096, 4096), "fc1": (4096, 22016), "fc2": (11008, 4096)}
SPARSITIES = (0.4, 0.5, 0.6, 0.7)
MASK_TOL = 1e-5  # GEMV: of max|y|


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and steps (CPU too): a check of the tool")
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant (the first 2 untimed)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel measurement")
    parser.add_argument("--train-variant", help=argparse.SUPPRESS)  # internal: one variant in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 3, 2
    return args


def progress(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return info


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@contextmanager
def torch_routes():
    """The torch definitions, not the Triton routes (``QSPARSE_TRITON=0`` is read at every dispatch)."""
    before = os.environ.get("QSPARSE_TRITON")
    os.environ["QSPARSE_TRITON"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("QSPARSE_TRITON")
        else:
            os.environ["QSPARSE_TRITON"] = before


@contextmanager
def triton_routes():
    """The Triton routes: on a GPU as the library takes them; on CPU (``--smoke``) in the interpreter."""
    if torch.cuda.is_available():
        yield
        return
    from megatron_qsparse.kernels.triton_routes import on_cpu_for_tests

    with on_cpu_for_tests():
        yield


# ---- 1. the Triton routes against torch ---------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    nan = b.isnan()
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.isnan(), nan) and torch.equal(a[~nan].view(view), b[~nan].view(view))


def kernel_cases(smoke: bool) -> List[dict]:
    """(name, shape, dtype, the call): the library's public functions, which dispatch to the Triton routes."""
    from megatron_qsparse.inference.sparse_linear import topk_linear
    from megatron_qsparse.sparsity import bitnet
    from megatron_qsparse.sparsity.topk import block_topk_mask, topk_mask

    tokens, hidden, ffn = (64, 256, 384) if smoke else (8192, 2048, 5472)
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device=device()).manual_seed(0)
        x = torch.randn(tokens, hidden, device=device(), generator=g).to(dtype)
        x_ffn = torch.randn(tokens, ffn, device=device(), generator=g).relu().square().to(dtype)  # ReLU² zeros
        w = torch.randn(ffn, hidden, device=device(), generator=g).to(dtype)
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        cases += [
            ("topk_mask 50%", f"{tokens}x{hidden} {name}", lambda x=x: topk_mask(x, hidden // 2)),
            ("topk_mask 50% (fc2)", f"{tokens}x{ffn} {name}", lambda x=x_ffn: topk_mask(x, ffn // 2)),
            ("block_topk_mask 16:32", f"{tokens}x{hidden} {name}", lambda x=x: block_topk_mask(x, 0.5, 32)),
            ("ternary (absmean)", f"{ffn}x{hidden} {name}", lambda w=w: bitnet.quantize_weight_ternary(w)),
            ("int8 absmax", f"{tokens}x{hidden} {name}", lambda x=x: bitnet.quantize_activation_int8(x)),
        ]
    g = torch.Generator(device=device()).manual_seed(1)
    x1 = torch.randn(1, hidden, device=device(), generator=g).to(torch.bfloat16)
    w_t = (torch.randn(hidden, ffn, device=device(), generator=g) / hidden**0.5).to(torch.bfloat16)
    cases.append(("decode GEMV 50%", f"1x{hidden}x{ffn} bf16", lambda: topk_linear(x1, w_t, None, 0.5)))
    return [{"route": r, "shape": s, "call": c} for r, s, c in cases]


def bench_kernels(args) -> List[dict]:
    rows = []
    for case in kernel_cases(args.smoke):
        with torch_routes():
            expected = case["call"]()
            torch_ms = median_ms(case["call"], args.repeats)
        with triton_routes():
            got = case["call"]()
            triton_ms = median_ms(case["call"], args.repeats)
        if case["route"].startswith("decode"):
            error = (got.float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
            # bf16 outputs: one bf16 ulp (2**-8 of |y|) on top of the fp32 sums' tolerance
            equal, detail = error <= MASK_TOL + 2**-8, f"max err {error:.1e} of max|y|"
        else:
            equal, detail = same_bits(got, expected), "bit-equal" if same_bits(got, expected) else "DIFFERS"
        rows.append(
            {
                "route": case["route"],
                "shape": case["shape"],
                "torch_ms": torch_ms,
                "triton_ms": triton_ms,
                "speedup": torch_ms / triton_ms,
                "equal": equal,
                "detail": detail,
            }
        )
        progress(f"kernels: {case['route']} {case['shape']}: {detail}, {torch_ms:.3f} -> {triton_ms:.3f} ms")
    return rows


# ---- 2. training steps through the trainer ------------------------------------------------------------------


def prepare_corpus(workdir: Path) -> Dict[str, str]:
    """The shipped corpus slice, tokenized with a BPE trained on it: the trainer's data flags."""
    from megatron_qsparse.data.preprocess import preprocess
    from megatron_qsparse.data.tokenizer import train_bpe_tokenizer

    source = REPO / "tests" / "data" / "corpus_slice.jsonl"
    tokenizer = train_bpe_tokenizer([source], workdir / "tokenizer", vocab_size=8192)
    prefix = workdir / "slice_text_document"
    preprocess([source], prefix, tokenizer, input_format="jsonl", workers=1)
    return {"data.tokenizer": str(tokenizer), "data.train": f"[{prefix}]", "data.valid": f"[{prefix}]"}


def train_overrides(variant: str, data: Dict[str, str], run_dir: Path, smoke: bool, steps: int) -> List[str]:
    shape = (
        ["model.preset=tiny", "model.ffn_hidden_size=704", "model.seq_length=64", "batch.micro_batch_size=2"]
        + ["batch.global_batch_size=4"]
        if smoke
        else [
            "model.preset=1.3b",
            "model.ffn_hidden_size=5472",
            "model.seq_length=2048",
            "batch.micro_batch_size=4",
            "batch.global_batch_size=8",
        ]
    )
    return (
        shape
        + [f"{k}={v}" for k, v in data.items()]
        + [
            f"train.steps={steps}",
            "train.dtype=auto",  # bf16 on a GPU
            f"log.run_dir={run_dir}",
            "log.tensorboard=false",
            "checkpoint.interval=0",
            "optimizer.zero_stage=2",
        ]
        + VARIANTS[variant]
    )


def topk_ms_per_step(cfg, variant: str, repeats: int) -> float:
    """The forward selections of one training step, timed alone on inputs of the sites' shapes: 3 sites of width
    hidden (qkv, proj, fc1) and fc2 of width ffn, per layer and microbatch."""
    from megatron_qsparse.sparsity.topk import block_topk_mask, kept_count, topk_mask

    m = cfg.model
    if not m.sparsity.default:
        return 0.0
    tokens = cfg.batch.micro_batch_size * m.seq_length
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    total = 0.0
    for width, sites in ((m.hidden_size, 3), (m.ffn_hidden_size, 1)):
        x = torch.randn(tokens, width, device=device(), dtype=dtype)
        s, block = m.sparsity.default, m.sparsity.block_size
        if block:
            select = functools.partial(block_topk_mask, x, s, block)
        else:
            select = functools.partial(topk_mask, x, kept_count(s, width))
        total += sites * median_ms(select, repeats)  # the routes the trainer takes here
    return total * m.num_layers * cfg.num_microbatches(1)


def train_one_variant(args) -> None:
    """In a process of its own (``--train-variant``): build the trainer, run the steps, write the result."""
    from megatron_qsparse.training.cli import init_process_group
    from megatron_qsparse.training.config import load_config
    from megatron_qsparse.training.trainer import Trainer

    overrides = json.loads(os.environ["GPU_CHECK_OVERRIDES"])
    cfg = load_config(REPO / "pretrain_scripts" / "configs" / "tiny-cpu.yaml", overrides)
    init_process_group()
    trainer = Trainer(cfg)  # on CUDA its layers take the Triton routes; on CPU (--smoke) the compiled ones
    records = [trainer.train_step(step) for step in range(cfg.train.steps)]
    timed = [r for r in records[2:] if r is not None] or [r for r in records if r is not None]
    step_s = statistics.median(r["step_time_s"] for r in timed)
    result = {
        "variant": args.train_variant,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": cfg.batch.global_batch_size * cfg.model.seq_length / step_s,
        "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
        "loss_first": records[0]["loss"] if records[0] else None,
        "loss_last": timed[-1]["loss"],
        "topk_ms": topk_ms_per_step(cfg, args.train_variant, args.repeats),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    result["topk_share"] = result["topk_ms"] / result["step_ms"]
    args.result.write_text(json.dumps(result))


def bench_train(args) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        progress("train: tokenizing the corpus slice")
        data = prepare_corpus(work)
        for variant in VARIANTS:
            progress(f"train: {variant} ({args.steps} steps in a process of its own)")
            result = work / f"{variant}.json"
            env = dict(os.environ)
            overrides = train_overrides(variant, data, work / f"run-{variant}", args.smoke, args.steps)
            env["GPU_CHECK_OVERRIDES"] = json.dumps(overrides)
            command = [sys.executable, __file__, "--train-variant", variant, "--result", str(result)]
            command += ["--repeats", str(args.repeats)]
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            if run.returncode != 0 or not result.exists():
                tail = (run.stderr or run.stdout).strip().splitlines()[-12:]
                progress(f"train: {variant} failed (exit {run.returncode}):\n  " + "\n  ".join(tail))
                rows.append({"variant": variant, "error": tail[-1] if tail else f"exit {run.returncode}"})
                continue
            rows.append(json.loads(result.read_text()))
            progress(f"train: {variant}: {rows[-1]['step_ms']:.0f} ms a step")
    dense = next((r for r in rows if r["variant"] == "dense" and "error" not in r), None)
    for r in rows:
        if dense and "error" not in r:
            r["vs_dense"] = r["step_ms"] / dense["step_ms"]
        r["goal"] = STEP_GOALS.get(r["variant"])
    return rows


# ---- 3. decode GEMV at the 7B shapes ------------------------------------------------------------------------


def bench_decode(args) -> List[dict]:
    from megatron_qsparse.inference.sparse_linear import topk_linear

    shapes = {"proj": (256, 384)} if args.smoke else DECODE_SHAPES
    rows = []
    g = torch.Generator(device=device()).manual_seed(3)
    for site, (n_in, n_out) in shapes.items():
        w = (torch.randn(n_out, n_in, device=device(), generator=g) / n_in**0.5).to(torch.bfloat16)
        w_t = w.t().contiguous()
        for batch in (1, 4):
            x = torch.randn(batch, n_in, device=device(), generator=g).to(torch.bfloat16)
            dense_ms = median_ms(functools.partial(torch.matmul, x, w.t()), args.repeats)
            for s in SPARSITIES:
                with triton_routes():
                    sparse_ms = median_ms(functools.partial(topk_linear, x, w_t, None, s), args.repeats)
                row = {
                    "site": site,
                    "in": n_in,
                    "out": n_out,
                    "batch": batch,
                    "sparsity": s,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "limit": 1 / (1 - s) if batch == 1 else None,
                    "weight_mb": w.numel() * 2 / 1e6,
                    "goal": DECODE_GOALS.get(s) if batch == 1 else None,
                }
                rows.append(row)
            progress(f"decode: {site} batch {batch} done")
    return rows


# ---- report -------------------------------------------------------------------------------------------------


def goals(report: dict) -> List[dict]:
    checks = []
    train = {r["variant"]: r for r in report.get("train", []) if "error" not in r}
    for variant, goal in STEP_GOALS.items():
        if variant in train and "dense" in train:
            checks.append({"goal": f"{variant} step <= {goal}x dense", "value": train[variant]["vs_dense"]})
            checks[-1]["met"] = checks[-1]["value"] <= goal
    if train.get("dense", {}).get("mfu") is not None:
        mfu = train["dense"]["mfu"]
        checks.append({"goal": f"dense MFU >= {DENSE_MFU_GOAL:.0%}", "value": mfu, "met": mfu >= DENSE_MFU_GOAL})
    for s, goal in DECODE_GOALS.items():
        rows = [r for r in report.get("decode", []) if r["sparsity"] == s and r["batch"] == 1]
        if rows:
            worst = min(r["speedup"] for r in rows)
            checks.append({"goal": f"decode GEMV >= {goal}x at {s:.0%}, batch 1 (worst site)", "value": worst})
            checks[-1]["met"] = worst >= goal
    return checks


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"gpu_check on {m['device']} (torch {m['torch']}, triton {m['triton']}, Python {m['python']})")
    if "kernels" in report:
        print("\n## Triton routes vs torch (median; CUDA events on a GPU)\n")
        print("| route | shape | torch ms | triton ms | speedup | equal |\n|---|---|---|---|---|---|")
        for r in report["kernels"]:
            print(
                f"| {r['route']} | {r['shape']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | "
                f"{r['speedup']:.2f}x | {r['detail']} |"
            )
    if "train" in report:
        print("\n## Training step through the trainer (one GPU, bf16, ZeRO-2)\n")
        print("| variant | step ms | tokens/s | MFU (Megatron-LM count) | vs dense | top-K share | goal |")
        print("|---|---|---|---|---|---|---|")
        for r in report["train"]:
            if "error" in r:
                print(f"| {r['variant']} | failed: {r['error']} | | | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            goal = f"<= {r['goal']}x" if r.get("goal") else ""
            print(
                f"| {r['variant']} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | {mfu} | "
                f"{r.get('vs_dense', float('nan')):.3f}x | {r['topk_share']:.1%} | {goal} |"
            )
    if "decode" in report:
        print("\n## Decode GEMV, bf16 (Triton sparse incl. top-K vs dense x @ Wᵀ)\n")
        print("| site | in x out | batch | sparsity | dense ms | sparse ms | speedup | limit 1/(1-s) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["decode"]:
            limit = f"{r['limit']:.2f}x" if r["limit"] else ""
            print(
                f"| {r['site']} | {r['in']}x{r['out']} | {r['batch']} | {r['sparsity']:.0%} | {r['dense_ms']:.4f} | "
                f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {limit} |"
            )
    if report["smoke"]:
        print("\n--smoke: tiny shapes (on CPU in the Triton interpreter): a check of the tool, not a measurement")
    elif report["goals"]:
        print("\n## Goals\n")
        for g in report["goals"]:
            value = f"{g['value']:.1%}" if "MFU" in g["goal"] else f"{g['value']:.2f}x"
            print(f"- {g['goal']}: {value} ({'met' if g['met'] else 'NOT met'})")
    print(f"\ntotal {report['wall_s']:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.train_variant:
        train_one_variant(args)
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --smoke to check the tool on CPU")
        return 2
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    t0 = time.time()
    report: Dict[str, object] = {"machine": machine(), "smoke": args.smoke}
    benches = {"kernels": bench_kernels, "train": bench_train, "decode": bench_decode}
    for section in args.sections:
        progress(f"section {section}")
        report[section] = benches[section](args)
    report["goals"] = goals(report)
    report["wall_s"] = time.time() - t0
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
