"""Whole-model decoding: the decode engine against llama.cpp on the same weights, on this CPU, in one run.

    python tools/bench_decode.py --engine            # 300M and 1.3B; fp32 and bf16 at s = 0/0.5/0.6/0.7;
                                                     # BitNet + Q-Sparse vs llama.cpp TQ2_0 (s = 0.6)
    python tools/bench_decode.py --engine --quick    # 300M only, bf16 and ternary, s = 0 / 0.6, 2 repeats
    python tools/bench_decode.py --engine --json     # one JSON object; its "results" hold a row per runtime,
                                                     # shape, dtype and sparsity

Per shape the same random weights (seeded, N(0, 0.02); norms 1) are written twice: as a Q-Sparse Hugging Face
export (config.json + model.safetensors; one config per sparsity, the same weights) for
``megatron_qsparse.inference.Engine``, and as GGUF (the ``gguf`` package; arch "llama", q/k rows permuted to
llama.cpp's RoPE layout) for llama.cpp through ``llama-cpp-python``. Both get the same threads, prompt
(``--prompt-tokens`` fixed ids) and ``--new-tokens`` greedy tokens; llama.cpp decodes dense. Runs take turns
(engine, llama.cpp, engine, ...) and each row is the median of ``--repeats``; llama.cpp's row is the median of
all its runs in the group. decode tokens/s counts the steps after the first new token; prefill tokens/s the
prompt (the engine runs the prompt token by token through the same decode step; llama.cpp batches it).

Ternary: BitNet b1.58 + Q-Sparse (packed 2-bit codes, int8 activations) against llama.cpp's TQ2_0, with the
FFN widened to a multiple of 256 (TQ2_0's block) on both sides and the LM head and embedding bf16 on both
(``output_tensor_type`` / ``token_embedding_type``); the tool checks that every layer matrix came out TQ2_0.
llama.cpp's llama graph uses a SiLU GLU where the paper's models use ReLU²: the same shapes and bytes.

``MB/token`` is what a runtime must read per token (weights of the projections at the kept fraction, the LM
head, one embedding row): the memory-bound limit; ``GB/s`` = MB/token x tokens/s.

llama.cpp is an optional benchmark dependency: ``pip install -r requirements-bench.txt`` (llama-cpp-python
0.3.36, built from source, ~4 minutes on 2 cores; gguf 0.19.0). Without it the engine rows are measured alone.
"""

import argparse
import ctypes
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_timing import machine, machine_line, print_report  # noqa: E402

from megatron_qsparse.hf.configuration_qsparse import SITES, QSparseHFConfig  # noqa: E402
from megatron_qsparse.inference.engine import Engine, default_threads  # noqa: E402

# The paper's shapes (hidden, GLU size, heads, layers); vocab 32000 as the LLaMA tokenizer.
SHAPES = {"300m": (1024, 2730, 16, 24), "1.3b": (2048, 5460, 32, 24)}
TERNARY_FFN = {"300m": 2816, "1.3b": 5632}  # the next multiples of 256 (TQ2_0 packs rows in blocks of 256)
VOCAB = 32000
GOALS = {("fp32", 0.5): 1.6, ("fp32", 0.6): 1.9, ("bf16", 0.5): 1.6, ("bf16", 0.6): 1.9, ("ternary", 0.6): 1.3}
INSTALL = "pip install -r requirements-bench.txt  (llama-cpp-python 0.3.36 builds llama.cpp from source, ~4 min)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="store_true", help="(the switch bench_decode.py passes on)")
    p.add_argument("--quick", action="store_true", help="300m, bf16 + ternary, s = 0 / 0.6, 2 repeats")
    p.add_argument("--json", action="store_true")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["300m", "1.3b"])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "ternary"], default=["fp32", "bf16", "ternary"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.6, 0.7])
    p.add_argument("--ternary-sparsities", nargs="+", type=float, default=[0.0, 0.6])
    p.add_argument("--threads", type=int, default=None, help="both runtimes (default: the cores given)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a smoke test)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the weights are written (default: a temporary directory, removed at the end)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.sparsities, args.ternary_sparsities = (
            ["300m"],
            ["bf16", "ternary"],
            [0.0, 0.6],
            [0.6],
        )
        args.repeats, args.new_tokens = 2, 32
    args.threads = args.threads or default_threads()
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_llama_cpp():
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


# ---- the weights, twice --------------------------------------------------------------------------------------
def hf_config(shape: str, ffn: int, sparsity: float, bitnet: bool, layers: Optional[int] = None) -> QSparseHFConfig:
    hidden, _, heads, depth = SHAPES[shape]
    layers = layers or depth
    return QSparseHFConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act="relu2",
        max_position_embeddings=512,
        sparsity={site: sparsity for site in SITES},
        bitnet=bitnet,
    )


def random_state(config: QSparseHFConfig) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f = config.hidden_size, config.intermediate_size

    def matrix(out, inp):
        return torch.empty(out, inp).normal_(0.0, 0.02, generator=g)

    state = {
        "model.embed_tokens.weight": matrix(VOCAB, h),
        "lm_head.weight": matrix(VOCAB, h),
        "model.norm.weight": torch.ones(h),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        state.update(
            {
                f"{p}.input_layernorm.weight": torch.ones(h),
                f"{p}.post_attention_layernorm.weight": torch.ones(h),
                f"{p}.self_attn.qkv_proj.weight": matrix(3 * h, h),
                f"{p}.self_attn.o_proj.weight": matrix(h, h),
                f"{p}.mlp.gate_up_proj.weight": matrix(2 * f, h),
                f"{p}.mlp.down_proj.weight": matrix(h, f),
            }
        )
    return state


def write_exports(
    state, shape: str, ffn: int, sparsities: List[float], bitnet: bool, root: Path, layers: Optional[int] = None
) -> Dict[float, Path]:
    """One export directory per sparsity: its config.json and a link to the one weights file."""
    from safetensors.torch import save_file

    weights = root / "model.safetensors"
    save_file(state, str(weights))
    out = {}
    for s in sparsities:
        directory = root / f"s{s}"
        directory.mkdir(exist_ok=True)
        hf_config(shape, ffn, s, bitnet, layers).to_json_file(str(directory / "config.json"))
        if not (directory / weights.name).exists():
            (directory / weights.name).symlink_to(weights)
        out[s] = directory
    return out


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half RoPE rows -> llama.cpp's interleaved pairs (what its HF converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def write_gguf(state, config: QSparseHFConfig, path: Path, dtype: str) -> None:
    """The same weights as a llama-architecture GGUF: fp32 or bf16 matrices, fp32 norms."""
    import gguf
    import numpy as np

    def array(t: torch.Tensor, matrix: bool):
        if matrix and dtype == "bf16":
            return t.bfloat16().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
        return t.float().numpy(), None

    h, heads = config.hidden_size, config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(h)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("none")

    def add(name, t, matrix=True):
        data, raw = array(t, matrix)
        writer.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"], matrix=False)
    add("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        q, k, v = state[f"{p}.self_attn.qkv_proj.weight"].split(h)
        gate, up = state[f"{p}.mlp.gate_up_proj.weight"].chunk(2)
        add(f"{b}.attn_norm.weight", state[f"{p}.input_layernorm.weight"], matrix=False)
        add(f"{b}.attn_q.weight", rope_permute(q, heads))
        add(f"{b}.attn_k.weight", rope_permute(k, heads))
        add(f"{b}.attn_v.weight", v)
        add(f"{b}.attn_output.weight", state[f"{p}.self_attn.o_proj.weight"])
        add(f"{b}.ffn_norm.weight", state[f"{p}.post_attention_layernorm.weight"], matrix=False)
        add(f"{b}.ffn_gate.weight", gate)
        add(f"{b}.ffn_up.weight", up)
        add(f"{b}.ffn_down.weight", state[f"{p}.mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_tq2_0(llama_cpp, source: Path, target: Path, threads: int) -> None:
    """llama.cpp's own quantizer: layer matrices TQ2_0, LM head and embedding bf16; refuses any fallback type."""
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
    params.output_tensor_type = int(gguf.GGMLQuantizationType.BF16)
    params.token_embedding_type = int(gguf.GGMLQuantizationType.BF16)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
    fallback = {
        t.name: t.tensor_type.name
        for t in gguf.GGUFReader(str(target)).tensors
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type != gguf.GGMLQuantizationType.TQ2_0
    }
    if fallback:
        raise RuntimeError(
            f"TQ2_0 fell back to other types for {len(fallback)} tensors, e.g. {list(fallback.items())[:3]}"
        )


# ---- runs ----------------------------------------------------------------------------------------------------
class LlamaCppRunner:
    def __init__(self, llama_cpp, path: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            logits_all=False,
        )
        self.llama_cpp = llama_cpp

    def run(self, prompt: List[int], new_tokens: int) -> Dict[str, float]:
        import numpy as np

        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = time.perf_counter() - start
        return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": (new_tokens - 1) / decode}


class EngineRunner:
    def __init__(self, directory: Path, dtype: str, threads: int):
        self.engine = Engine.from_pretrained(directory, dtype=dtype, threads=threads, max_seq_len=512)

    def run(self, prompt: List[int], new_tokens: int) -> Dict[str, float]:
        self.engine.generate(prompt, new_tokens)
        s = self.engine.stats
        return {"prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s}


def median_rates(runs: List[Dict[str, float]]) -> Dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def bytes_per_token(config: QSparseHFConfig, sparsity: float, weight_bytes: float, head_bytes: float) -> float:
    """Weights a decode step must read: the projections' kept fraction, the LM head, one embedding row."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    projections = layers * (3 * h * h + h * h + 2 * f * h + f * h)
    return (1 - sparsity) * projections * weight_bytes + (VOCAB + 1) * h * head_bytes


def bench_group(shape: str, dtype: str, sparsities: List[float], args, llama_cpp, root: Path) -> List[dict]:
    """Every engine sparsity against llama.cpp's dense decode of the same weights, interleaved."""
    bitnet = dtype == "ternary"
    ffn = TERNARY_FFN[shape] if bitnet else SHAPES[shape][1]
    config = hf_config(shape, ffn, 0.0, bitnet, args.layers)
    progress(f"{shape} {dtype}: random weights (ffn {ffn}) and their exports")
    group = root / f"{shape}-{'ternary' if bitnet else 'fp'}"
    group.mkdir(exist_ok=True)
    state = random_state(config)
    exports = write_exports(state, shape, ffn, sparsities, bitnet, group, args.layers)
    llama = None
    if llama_cpp is not None:
        gguf_path = group / f"{dtype}.gguf"
        progress(f"{shape} {dtype}: GGUF for llama.cpp")
        write_gguf(state, config, group / "f32.gguf" if bitnet else gguf_path, "fp32" if bitnet else dtype)
        if bitnet:
            quantize_tq2_0(llama_cpp, group / "f32.gguf", gguf_path, args.threads)
            (group / "f32.gguf").unlink()
        llama = LlamaCppRunner(llama_cpp, gguf_path, args.threads, args.prompt_tokens + args.new_tokens + 8)
    del state
    gc.collect()
    prompt = torch.randint(0, VOCAB, (args.prompt_tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    engine_dtype = "bf16" if bitnet else dtype
    weight_bytes = 0.25 if bitnet else (4 if dtype == "fp32" else 2)
    head_bytes = 4 if dtype == "fp32" else 2
    rows, llama_runs = [], []
    for s in sparsities:
        progress(f"{shape} {dtype}: engine at s = {s} against llama.cpp")
        engine = EngineRunner(exports[s], engine_dtype, args.threads)
        engine.run(prompt, 4)  # warm: first touches of the weights and the cache
        if llama is not None:
            llama.run(prompt, 4)
        runs, paired = [], []
        for repeat in range(args.repeats):
            order = [engine, llama] if repeat % 2 == 0 else [llama, engine]
            for runner in order:
                if runner is None:
                    continue
                (runs if runner is engine else paired).append(runner.run(prompt, args.new_tokens))
        llama_runs += paired
        rate = median_rates(runs)
        row = {
            "runtime": "engine",
            "shape": shape,
            "dtype": dtype,
            "sparsity": s,
            **rate,
            "mb_per_token": bytes_per_token(config, s, weight_bytes, head_bytes) / 1e6,
        }
        if paired:
            row["vs_llama_cpp"] = rate["decode_tokens_per_s"] / median_rates(paired)["decode_tokens_per_s"]
            goal = GOALS.get((dtype, s)) or (0.95 if s == 0 and not bitnet else None)
            if goal:
                row["goal"], row["met"] = goal, row["vs_llama_cpp"] >= goal
        rows.append(row)
        del engine
        gc.collect()
    if llama_runs:
        llama_bytes = 2.0625 / 8 if bitnet else weight_bytes  # TQ2_0: 66 bytes per 256 weights
        rows.insert(
            0,
            {
                "runtime": "llama.cpp",
                "shape": shape,
                "dtype": dtype,
                "sparsity": 0.0,
                **median_rates(llama_runs),
                "mb_per_token": bytes_per_token(config, 0.0, llama_bytes, head_bytes) / 1e6,
            },
        )
    del llama
    gc.collect()
    for path in group.glob("*.gguf"):
        path.unlink()
    return rows


def print_table(report: dict) -> None:
    c = report["config"]
    print(machine_line(report["machine"]))
    print(
        f"threads {c['threads']} (both runtimes); prompt {c['prompt_tokens']} tokens, {c['new_tokens']} new "
        f"(greedy), batch 1; median of {c['repeats']} interleaved runs; llama.cpp: {c['llama_cpp']}"
    )
    header = (
        f"{'shape':<6}{'dtype':<9}{'runtime':<11}{'s':>5}{'decode tok/s':>14}{'prefill tok/s':>15}"
        f"{'MB/token':>10}{'GB/s':>7}{'vs llama.cpp':>14}  goal"
    )
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        vs = f"{r['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in r else ""
        goal = f">= {r['goal']}x {'met' if r['met'] else 'NOT met'}" if "goal" in r else ""
        bandwidth = r["mb_per_token"] * r["decode_tokens_per_s"] / 1e3
        print(
            f"{r['shape']:<6}{r['dtype']:<9}{r['runtime']:<11}{r['sparsity']:>5.2f}{r['decode_tokens_per_s']:>14.2f}"
            f"{r['prefill_tokens_per_s']:>15.1f}{r['mb_per_token']:>10.1f}{bandwidth:>7.1f}{vs:>14}  {goal}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    llama_cpp = load_llama_cpp()
    if llama_cpp is None:
        progress(f"llama.cpp is not installed: measuring the engine alone. For the comparison: {INSTALL}")
    torch.set_num_threads(args.threads)
    report = {
        "machine": machine(),
        "config": {
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "layers": args.layers,
            "shapes": {s: dict(zip(("hidden", "ffn", "heads", "layers"), SHAPES[s])) for s in args.shapes},
            "vocab": VOCAB,
            "ternary_ffn": TERNARY_FFN,
            "llama_cpp": ("llama-cpp-python " + llama_cpp.__version__) if llama_cpp else f"not installed ({INSTALL})",
        },
        "results": [],
    }
    root = Path(tempfile.mkdtemp(prefix="qsparse-bench-", dir=args.work_dir))
    try:
        for shape in args.shapes:
            for dtype in args.dtypes:
                sparsities = args.ternary_sparsities if dtype == "ternary" else args.sparsities
                report["results"] += bench_group(shape, dtype, sparsities, args, llama_cpp, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return print_report(report, args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
