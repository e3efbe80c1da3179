"""The decode engine: generation from a Q-Sparse Hugging Face export with the whole decoder step compiled.

    engine = Engine.from_pretrained("exports/my-model", dtype="bf16")    # or "fp32"; threads=None: the cores given
    new_ids = engine.generate(prompt_ids, max_new_tokens=64)             # greedy; temperature/top_k/top_p/seed

Each token is one call into ``torch.classes.qsparse.Engine`` (``megatron_qsparse/kernels/engine.cpp``, built with
the project's other CPU ops on first use): embedding, norms, the exact Q-Sparse top-K at the four sites (or
Block N:M), products that read only the kept rows of Wᵀ, RoPE, GQA attention over a preallocated fp32 KV cache,
ReLU²/SiLU GLU or MoE routed to the top-k experts, final norm, LM head and sampling. No Python runs per op.

What is read per token, by site: a projection at sparsity 0 reads W as exported (row-major dot products); a
sparse one reads only the kept rows of an input-major copy Wᵀ (made here, at load). BitNet b1.58 exports always
run on packed ternary weights, 2 bits per weight with the per-tensor absmean scale (the codes and scale of
``megatron_qsparse.sparsity.bitnet``), against int8 absmax levels of the kept inputs: exact integer sums. The
embedding and LM head (full precision in BitNet too) are fp32 or bf16 by ``dtype``; activations, the KV cache and
every sum are fp32 whatever ``dtype`` is, so a bf16 engine equals the fp32 forward of the bf16-rounded weights.

The engine's logits equal the export's masked dense forward (``QSparseForCausalLM``) up to fp32 summation order:
``tests/inference/test_engine.py``. One sequence (``generate``) or up to 8 together (``generate_batch``: the
projections read the union of the tokens' kept rows once).
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_qsparse import kernels
from megatron_qsparse.sparsity.bitnet import ternary_codes, weight_scale
from megatron_qsparse.sparsity.topk import kept_count

DTYPES = kernels.DTYPES
ACTIVATIONS = {"relu2": 0, "silu": 1}
NORMS = {"rmsnorm": 0, "layernorm": 1}
DENSE, GATHER, TERNARY = 0, 1, 2  # projection kinds of engine.cpp
MAX_BATCH = 8  # kMaxBatch of engine.cpp
PHASES = ("select", "dense_products", "gather_products", "ternary_products", "attention", "lm_head", "step")
NONE = torch.empty(0)  # an absent optional tensor (bias, LayerNorm bias, router)


class EngineError(ValueError):
    """An export the engine cannot run, or a request it cannot serve; the message names the field and the fix."""


def default_threads() -> int:
    """The cores this process may run on (its affinity mask: what a Slurm or taskset allocation gives)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pack_ternary(weight: torch.Tensor) -> (torch.Tensor, float):
    """BitNet b1.58 weight W [out, in] -> (input-major packed codes uint8 [in, ceil(out/128)·32], alpha).

    Codes and alpha are ``megatron_qsparse.sparsity.bitnet``'s (``ternary_codes``: RoundClip(W / alpha, -1, 1),
    alpha = mean|W| clamped). Row r of the result holds the codes + 1 of Wᵀ[r, :]; in each 32-byte block g, byte b
    carries outputs 128g + 32j + b (j = 0..3) in bits 2j, 2j+1 (the order engine.cpp unpacks)."""
    alpha = float(weight_scale(weight))
    codes = (ternary_codes(weight).t() + 1).to(torch.uint8)  # [in, out], {0, 1, 2}
    rows, out = codes.shape
    groups = -(-out // 128)
    padded = torch.ones(rows, groups * 128, dtype=torch.uint8)  # padding codes 1 = weight 0
    padded[:, :out] = codes
    j = padded.view(rows, groups, 4, 32)
    packed = j[:, :, 0] | (j[:, :, 1] << 2) | (j[:, :, 2] << 4) | (j[:, :, 3] << 6)
    return packed.reshape(rows, groups * 32).contiguous(), alpha


def unpack_ternary(packed: torch.Tensor, out: int) -> torch.Tensor:
    """The inverse of ``pack_ternary``'s codes: int8 ternary weights [out, in] (for tests and inspection)."""
    rows = packed.shape[0]
    blocks = packed.view(rows, -1, 1, 32)
    codes = torch.cat([(blocks >> (2 * j)) & 3 for j in range(4)], dim=2).reshape(rows, -1)[:, :out]
    return (codes.to(torch.int8) - 1).t().contiguous()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: Optional[int] = None  # tokens made in decode_seconds (default: new_tokens - 1)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (each one decode step), per second of those steps."""
        steps = self.new_tokens - 1 if self.decode_tokens is None else self.decode_tokens
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def _read_config(export_dir: Path) -> dict:
    path = export_dir / "config.json"
    if not path.is_file():
        raise EngineError(
            f"{path}: not found; pass the directory of a Hugging Face export "
            "(tools/convert_to_hf.py writes config.json and model.safetensors)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EngineError(f"{path}: not valid JSON ({error}); re-export the model") from None
    if config.get("model_type") != "qsparse":
        raise EngineError(
            f"{path}: model_type {config.get('model_type')!r}: the engine runs this project's Q-Sparse exports "
            "(model_type 'qsparse'); import a stock Llama/Mistral/Qwen2 model with tools/convert_from_hf.py, "
            "train or convert it, then export it with tools/convert_to_hf.py"
        )
    for key, allowed in (("hidden_act", ACTIVATIONS), ("normalization", NORMS)):
        if config.get(key, "relu2" if key == "hidden_act" else "rmsnorm") not in allowed:
            raise EngineError(
                f"{path}: {key} {config.get(key)!r} is not supported by the engine; supported: {sorted(allowed)}"
            )
    return config


def _read_weights(export_dir: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{export_dir}: no *.safetensors weights; re-export with tools/convert_to_hf.py")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


class Engine:
    """A loaded model, its KV cache and sampler. Build with ``Engine.from_pretrained``."""

    def __init__(self, core, config: dict, dtype: str, threads: int, max_seq_len: int, max_batch: int):
        self.core, self.config, self.dtype, self.threads, self.max_seq_len = core, config, dtype, threads, max_seq_len
        self.max_batch = max_batch
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(
        cls,
        export_dir,
        dtype: str = "bf16",
        threads: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        max_batch: int = 1,
    ) -> "Engine":
        """Load an export (config.json + safetensors). ``dtype``: "fp32" or "bf16" weights (BitNet projections are
        packed ternary either way); ``threads``: default the cores given; ``max_seq_len``: KV cache positions
        (default the config's ``max_position_embeddings``); ``max_batch``: sequences ``generate_batch`` decodes
        together (1 to 8; each gets its own KV cache)."""
        export_dir = Path(export_dir)
        if dtype not in DTYPES:
            raise EngineError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        threads = threads or default_threads()
        if threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise EngineError(f"max_batch must lie in [1, {MAX_BATCH}], got {max_batch}")
        config = _read_config(export_dir)
        ops = kernels.require("The decode engine")
        state = _read_weights(export_dir)
        max_seq_len = max_seq_len or int(config.get("max_position_embeddings", 2048))
        core = _Builder(config, state, DTYPES[dtype], export_dir, ops).build(max_seq_len, threads, max_batch)
        return cls(core, config, dtype, threads, max_seq_len, max_batch)

    def profile(self, reset: bool = False) -> Dict[str, float]:
        """Seconds per phase of the compiled step since the last reset (``other`` = the step's remainder: norms,
        embedding, RoPE, activations, residuals, MoE routing)."""
        seconds = dict(zip(PHASES, self.core.profile()))
        seconds["other"] = seconds["step"] - sum(v for k, v in seconds.items() if k != "step")
        if reset:
            self.core.profile_reset()
        return seconds

    # ---- running -----------------------------------------------------------------------------------------------
    def _check_prompt(self, ids: Sequence[int], new_tokens: int) -> List[int]:
        ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise EngineError("the prompt is empty: give at least one token id")
        vocab = self.config["vocab_size"]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise EngineError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {vocab})")
        if len(ids) + new_tokens > self.max_seq_len:
            raise EngineError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({new_tokens}) exceeds the KV cache of "
                f"{self.max_seq_len} positions; shorten the prompt, ask for fewer tokens, or load with "
                f"max_seq_len >= {len(ids) + new_tokens}"
            )
        return ids

    def _start(self, temperature: float, top_k: Optional[int], top_p: Optional[float], seed: Optional[int]):
        """Checks the sampling settings, empties the cache and seeds the sampler (None: fresh entropy); returns
        the settings as the compiled sampler takes them (top_k 0 and top_p 1 mean off)."""
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise EngineError(f"top_p must lie in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {top_k}")
        self.core.reset()
        self.core.seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return float(temperature), int(top_k or 0), float(top_p or 1.0)

    @torch.no_grad()
    def logits(self, input_ids) -> torch.Tensor:
        """fp32 logits [tokens, vocab] of every position of ``input_ids``, from an empty cache."""
        ids = self._check_prompt(input_ids, 0)
        self.core.reset()
        return torch.stack([self.core.step(i).clone() for i in ids])

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        on_token: Optional[Callable[[int], None]] = None,
    ) -> List[int]:
        """The new token ids after ``input_ids`` (a list or a [1, T] tensor), from an empty cache: greedy at
        ``temperature`` 0, else sampled from softmax(logits / temperature) within ``top_k`` / ``top_p``, with a
        generator seeded by ``seed`` (None: fresh entropy). Stops after ``max_new_tokens`` or at ``eos_token_id``.
        ``on_token`` sees each id as it is produced. Timings land in ``self.stats``."""
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self._check_prompt(input_ids, max_new_tokens)
        core = self.core
        temperature, top_k, top_p = self._start(temperature, top_k, top_p, seed)
        self.stats = stats = GenerationStats(prompt_tokens=len(ids))
        new: List[int] = []
        start = time.perf_counter()
        for token in ids[:-1]:
            core.step(token)
        logits = core.step(ids[-1])
        stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        while len(new) < max_new_tokens:
            token = core.sample(logits, temperature, top_k, top_p)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_token_id or len(new) == max_new_tokens:
                break
            logits = core.step(token)
        stats.new_tokens = len(new)
        stats.decode_seconds = time.perf_counter() - start
        return new

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        eos_token_id: Optional[int] = None,
    ) -> List[List[int]]:
        """``generate`` for up to ``max_batch`` prompts at once: every step feeds each unfinished sequence its
        next token (a prompt token, or the one it sampled last) in one compiled call, whose projections read the
        union of the tokens' kept rows once. Prompts may differ in length. Returns the new ids per prompt; the
        same as one ``generate`` per prompt up to fp32 summation order (greedy; sampling draws from one
        generator in turn)."""
        if not 1 <= len(prompts) <= self.max_batch:
            raise EngineError(
                f"{len(prompts)} prompts: the engine was loaded for 1 to {self.max_batch} "
                "(from_pretrained(..., max_batch=N), N <= 8)"
            )
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompts = [self._check_prompt(p, max_new_tokens) for p in prompts]
        core = self.core
        temperature, top_k, top_p = self._start(temperature, top_k, top_p, seed)
        fed = [0] * len(prompts)  # tokens fed so far, per sequence
        new: List[List[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        self.stats = stats = GenerationStats(prompt_tokens=sum(map(len, prompts)), decode_tokens=0)
        while not all(done):
            slots = [b for b in range(len(prompts)) if not done[b]]
            tokens = [prompts[b][fed[b]] if fed[b] < len(prompts[b]) else new[b][-1] for b in slots]
            decoding = all(fed[b] >= len(prompts[b]) for b in slots)  # a step of new tokens only
            start = time.perf_counter()
            logits = core.step_batch(tokens, slots)
            seconds = time.perf_counter() - start
            if decoding:
                stats.decode_seconds += seconds
                stats.decode_tokens += len(slots)
            else:
                stats.prefill_seconds += seconds
            for row, b in enumerate(slots):
                fed[b] += 1
                if fed[b] < len(prompts[b]):
                    continue  # still reading its prompt
                token = core.sample(logits[row], temperature, top_k, top_p)
                new[b].append(token)
                done[b] = len(new[b]) == max_new_tokens or token == eos_token_id
        stats.new_tokens = sum(map(len, new))
        return new


class _Builder:
    """Turns an export's tensors into the compiled engine's projections and layers."""

    def __init__(self, config: dict, state: Dict[str, torch.Tensor], dtype: torch.dtype, export_dir: Path, ops):
        self.config, self.state, self.dtype, self.export_dir = config, state, dtype, export_dir
        self.sparsity = {site: float(v) for site, v in (config.get("sparsity") or {}).items()}
        self.block = config.get("block_size")
        self.bitnet = bool(config.get("bitnet"))

    def tensor(self, key: str, optional: bool = False) -> Optional[torch.Tensor]:
        if key not in self.state:
            if optional:
                return None
            raise EngineError(
                f"{self.export_dir}: the weights lack {key!r}; the export is incomplete or not a "
                "Q-Sparse export of this project (re-export with tools/convert_to_hf.py)"
            )
        return self.state[key]

    def vector(self, key: str, optional: bool = False) -> torch.Tensor:
        t = self.tensor(key, optional)
        return NONE if t is None else t.detach().float().contiguous()

    def add_projection(self, core, key: str, site: str) -> int:
        weight = self.tensor(f"{key}.weight").detach()
        bias = self.vector(f"{key}.bias", optional=True)
        out, inp = weight.shape
        sparsity = self.sparsity.get(site, 0.0)
        segment = self.block if (self.block and sparsity > 0) else inp
        if inp % segment:
            raise EngineError(
                f"{self.export_dir}/config.json: block_size {self.block} does not divide the input size {inp} of {key}"
            )
        k = kept_count(sparsity, segment)
        if self.bitnet:
            packed, alpha = pack_ternary(weight)
            return core.add_projection(packed, bias, TERNARY, inp, out, k, segment, alpha)
        weight = weight.to(self.dtype)
        if sparsity == 0:
            return core.add_projection(weight.contiguous(), bias, DENSE, inp, out, k, segment, 1.0)
        return core.add_projection(weight.t().contiguous(), bias, GATHER, inp, out, k, segment, 1.0)

    def rope_tables(self, max_seq_len: int):
        """cos / sin [positions, head_dim / 2] computed as the HF model computes its angles."""
        d = self.head_dim
        theta = float(self.config.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
        angles = torch.arange(max_seq_len).float()[:, None] * inv_freq
        return angles.cos().contiguous(), angles.sin().contiguous()

    def build(self, max_seq_len: int, threads: int, max_batch: int):
        c = self.config
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        self.head_dim = c.get("head_dim") or c["hidden_size"] // heads
        embed = self.tensor("model.embed_tokens.weight").detach().to(self.dtype).contiguous()
        lm_head = self.tensor("lm_head.weight", optional=True)
        lm_head = embed if lm_head is None else lm_head.detach().to(self.dtype).contiguous()
        cos, sin = self.rope_tables(max_seq_len)
        layernorm = c.get("normalization", "rmsnorm") == "layernorm"
        dims = [
            c["vocab_size"],
            c["hidden_size"],
            heads,
            kv_heads,
            self.head_dim,
            c["num_hidden_layers"],
            max_seq_len,
            ACTIVATIONS[c.get("hidden_act", "relu2")],
            NORMS[c.get("normalization", "rmsnorm")],
            int(c.get("num_experts_per_tok") or 0) if c.get("num_experts") else 0,
            threads,
            max_batch,
        ]
        norm_bias = (lambda key: self.vector(key)) if layernorm else (lambda key: NONE)
        core = torch.classes.qsparse.Engine(
            dims,
            [float(c.get("rms_norm_eps", 1e-5))],
            embed,
            lm_head,
            self.vector("model.norm.weight"),
            norm_bias("model.norm.bias"),
            cos,
            sin,
        )
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            qkv = self.add_projection(core, f"{p}.self_attn.qkv_proj", "qkv")
            o = self.add_projection(core, f"{p}.self_attn.o_proj", "proj")
            if c.get("num_experts"):
                router = self.tensor(f"{p}.mlp.router.weight").detach().to(self.dtype).float().contiguous()
                ffn = []
                for e in range(c["num_experts"]):
                    ffn += [
                        self.add_projection(core, f"{p}.mlp.experts.{e}.gate_up_proj", "fc1"),
                        self.add_projection(core, f"{p}.mlp.experts.{e}.down_proj", "fc2"),
                    ]
            else:
                router = NONE
                ffn = [
                    self.add_projection(core, f"{p}.mlp.gate_up_proj", "fc1"),
                    self.add_projection(core, f"{p}.mlp.down_proj", "fc2"),
                ]
            core.add_layer(
                self.vector(f"{p}.input_layernorm.weight"),
                norm_bias(f"{p}.input_layernorm.bias"),
                qkv,
                o,
                self.vector(f"{p}.post_attention_layernorm.weight"),
                norm_bias(f"{p}.post_attention_layernorm.bias"),
                router,
                ffn,
            )
        return core
