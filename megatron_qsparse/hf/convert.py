"""Mappings between our megatron-core state dict (TP=PP=EP=1 view), our Hugging Face model, and the stock
Llama / Mistral / Qwen2 layout, plus the export and import workflows used by ``tools/convert_*_hf.py``.

Megatron keeps QKV fused and grouped per query group (``view(G, H/G + 2, d, hidden)``: the group's query heads,
then its key head, then its value head); our HF model keeps it fused as [q; k; v]; Llama keeps three matrices.
fc1 is [gate; up] in both of ours. The embedding is padded to ``vocab_divisible_by`` in megatron and trimmed to
the tokenizer's vocabulary in HF.
"""

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.model.config import QSparseConfig, SparsityConfig

Tensors = Dict[str, torch.Tensor]
IMPORTABLE = ("llama", "mistral", "qwen2")


# ---- configs -------------------------------------------------------------------------------------------------
def hf_config_from(cfg: QSparseConfig) -> QSparseHFConfig:
    return QSparseHFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, hidden_act=cfg.activation,
        normalization=cfg.normalization, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
        max_position_embeddings=cfg.seq_length, attention_bias=cfg.add_qkv_bias,
        tie_word_embeddings=cfg.tie_embeddings, sparsity=cfg.sparsity.ratios(), block_size=cfg.sparsity.block_size,
        bitnet=cfg.bitnet, num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        initializer_range=cfg.init_method_std,
    )


def config_from_stock(hf: dict, source: str = "config.json") -> QSparseConfig:
    """Our model description of a dense Llama / Mistral / Qwen2 checkpoint (SwiGLU, RMSNorm, RoPE)."""
    family = hf.get("model_type")
    if family not in IMPORTABLE:
        raise ValueError(f"{source}: model_type {family!r} is not importable; supported: {IMPORTABLE}")
    if hf.get("rope_scaling"):
        raise ValueError(f"{source}: rope_scaling {hf['rope_scaling']} is not supported (plain RoPE only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) models are importable")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return QSparseConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        vocab_size=hf["vocab_size"], seq_length=min(hf.get("max_position_embeddings", 4096), 4096),
        activation="silu", norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=float(rope),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        sparsity=SparsityConfig(),
    )


# ---- tensors -------------------------------------------------------------------------------------------------
def _qkv_grouped_to_plain(t: torch.Tensor, cfg: QSparseConfig) -> torch.Tensor:
    g, per = cfg.query_groups, cfg.num_attention_heads // cfg.query_groups
    w = t.reshape(g, per + 2, cfg.head_dim, *t.shape[1:])
    q, k, v = w[:, :per], w[:, per], w[:, per + 1]
    return torch.cat([x.reshape(-1, *t.shape[1:]) for x in (q, k, v)])


def _qkv_plain_to_grouped(t: torch.Tensor, cfg: QSparseConfig) -> torch.Tensor:
    g, per, d = cfg.query_groups, cfg.num_attention_heads // cfg.query_groups, cfg.head_dim
    q, k, v = t.split([g * per * d, g * d, g * d])
    rest = t.shape[1:]
    grouped = torch.cat([q.reshape(g, per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def _layer_map(cfg: QSparseConfig, i: int) -> Dict[str, str]:
    """megatron key -> our HF key, for layer i (transforms for qkv applied separately)."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {m + "input_layernorm.weight": h + "input_layernorm.weight",
           m + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight",
           m + "self_attention.linear_qkv.weight": h + "self_attn.qkv_proj.weight",
           m + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight"}
    if cfg.normalization == "layernorm":
        out[m + "input_layernorm.bias"] = h + "input_layernorm.bias"
        out[m + "pre_mlp_layernorm.bias"] = h + "post_attention_layernorm.bias"
    if cfg.add_qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = h + "self_attn.qkv_proj.bias"
    if cfg.num_experts:
        out[m + "mlp.router.weight"] = h + "mlp.router.weight"
        for e in range(cfg.num_experts):
            out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = h + f"mlp.experts.{e}.gate_up_proj.weight"
            out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = h + f"mlp.experts.{e}.down_proj.weight"
    else:
        out[m + "mlp.linear_fc1.weight"] = h + "mlp.gate_up_proj.weight"
        out[m + "mlp.linear_fc2.weight"] = h + "mlp.down_proj.weight"
    return out


def _key_map(cfg: QSparseConfig) -> Dict[str, str]:
    out = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight"}
    if cfg.normalization == "layernorm":
        out["decoder.final_layernorm.bias"] = "model.norm.bias"
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        out.update(_layer_map(cfg, i))
    return out


def megatron_to_hf(state: Tensors, cfg: QSparseConfig) -> Tensors:
    out = {}
    for mkey, hkey in _key_map(cfg).items():
        t = state[mkey]
        if "linear_qkv" in mkey:
            t = _qkv_grouped_to_plain(t, cfg)
        elif mkey in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[: cfg.vocab_size]
        out[hkey] = t.detach().clone().contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_to_megatron(state: Tensors, cfg: QSparseConfig) -> Tensors:
    out = {}
    for mkey, hkey in _key_map(cfg).items():
        t = state[hkey]
        if "linear_qkv" in mkey:
            t = _qkv_plain_to_grouped(t, cfg)
        elif mkey in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - t.shape[0], t.shape[1])])
        out[mkey] = t.contiguous()
    return out


def stock_to_hf(state: Tensors, cfg: QSparseConfig) -> Tensors:
    """Llama/Mistral/Qwen2 tensors -> our HF layout (fuse q/k/v and gate/up)."""
    out = {}
    for key, t in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight", "k_proj.bias", "v_proj.bias")):
            continue
        if ".q_proj." in key:
            k, v = state[key.replace("q_proj", "k_proj")], state[key.replace("q_proj", "v_proj")]
            out[key.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v])
        elif key.endswith("gate_proj.weight"):
            out[key.replace("gate_proj", "gate_up_proj")] = torch.cat([t, state[key.replace("gate_proj", "up_proj")]])
        else:
            out[key] = t
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_to_stock(state: Tensors, cfg: QSparseConfig) -> Tensors:
    """Our HF layout -> Llama/Mistral/Qwen2 tensors (split fused projections). Dense models only."""
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.query_groups * cfg.head_dim
    out = {}
    for key, t in state.items():
        if ".qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q_rows, kv_rows, kv_rows])):
                out[key.replace("qkv_proj", name)] = part
        elif ".gate_up_proj." in key:
            gate, up = t.chunk(2)
            out[key.replace("gate_up_proj", "gate_proj")], out[key.replace("gate_up_proj", "up_proj")] = gate, up
        elif not (cfg.tie_embeddings and key == "lm_head.weight"):
            out[key] = t
    return out


def read_safetensors_dir(path: Path) -> Tensors:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (save the model with safe_serialization)")
    state: Tensors = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


# ---- export --------------------------------------------------------------------------------------------------
def _inlined_ops_source() -> str:
    """The project's top-K and quantizer modules, verbatim, as the exported ``qsparse_ops.py``."""
    import importlib

    from megatron_qsparse.hf import qsparse_ops

    parts = ['"""Copied at export from megatron_qsparse (' + ", ".join(qsparse_ops.EXPORTED_MODULES) +
             '): the same code that trained this model."""\n']
    for i, name in enumerate(qsparse_ops.EXPORTED_MODULES):
        lines = inspect.getsource(importlib.import_module(name)).splitlines()
        for n, line in enumerate(lines):
            if not (line.startswith(("import ", "from ")) and "megatron_qsparse" in line):
                continue
            # An import of a module exported before this one: its names are already in the one file.
            if line.split()[1] not in qsparse_ops.EXPORTED_MODULES[:i]:
                raise RuntimeError(f"{name} imports {line.split()[1]}; it cannot be exported standalone")
            lines[n] = f"# {line}  (inlined above)"
        parts.append(f"# ---- {name} ----\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


@contextlib.contextmanager
def atomic_directory(output: Path):
    """Yield a temporary directory beside ``output``; it becomes ``output`` only if the block succeeds.
    Refuses to replace a non-empty directory."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new output directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_model(state: Tensors, cfg: QSparseConfig, output: Path, tokenizer: Optional[Path] = None,
                  stock_format: bool = False, log=print) -> Path:
    """Write an HF checkpoint (safetensors + config + code files + tokenizer) atomically into ``output``."""
    from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM

    with atomic_directory(output) as tmp:
        hf_state = megatron_to_hf(state, cfg)
        if stock_format:
            _save_stock(hf_state, cfg, tmp)
        else:
            model = QSparseForCausalLM(hf_config_from(cfg))
            missing, unexpected = model.load_state_dict(hf_state, strict=False)
            if unexpected or [k for k in missing if k != "lm_head.weight"]:
                raise RuntimeError(f"state mismatch: missing {missing}, unexpected {unexpected}")
            model.config.register_for_auto_class()
            model.register_for_auto_class("AutoModelForCausalLM")
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "qsparse_ops.py").write_text(_inlined_ops_source())
        if tokenizer is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(tmp)
    log(f"wrote {output}")
    return output


def _save_stock(hf_state: Tensors, cfg: QSparseConfig, directory: Path) -> None:
    if any(r > 0 for r in cfg.sparsity.ratios().values()) or cfg.bitnet or cfg.num_experts:
        raise ValueError("--format llama is for dense models only: a sparse or BitNet model exported as a stock "
                         "Llama would silently run dense; export it as qsparse")
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, max_position_embeddings=cfg.seq_length, attention_bias=cfg.add_qkv_bias,
        tie_word_embeddings=cfg.tie_embeddings)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in hf_to_stock(hf_state, cfg).items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ---- megatron side (one process, TP=PP=EP=1: dist checkpoints reshard on load) ---------------------------------
def load_megatron_state(checkpoint: Path):
    """(state dict, model config, trainer state) of a checkpoint written under any TP/PP/EP layout."""
    from megatron_qsparse.model.gpt import build_gpt_model
    from megatron_qsparse.parallel.state import single_process_model_parallel
    from megatron_qsparse.training.checkpoint import load_model, read_trainer_state, resolve_checkpoint

    path = resolve_checkpoint(Path(checkpoint))
    trainer_state = read_trainer_state(path)
    model_dict = dict(trainer_state["config"]["model"])
    model_dict.pop("preset", None)
    cfg = QSparseConfig.from_dict(model_dict)
    with single_process_model_parallel():
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        load_model(model, path)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return state, cfg, trainer_state


def save_megatron_checkpoint(state: Tensors, cfg: QSparseConfig, output: Path, source: str) -> Path:
    """Our checkpoint format (model as a distributed checkpoint + trainer_state.json), usable as
    ``train.init_from`` under any layout."""
    from megatron.core import dist_checkpointing

    from megatron_qsparse.model.gpt import build_gpt_model
    from megatron_qsparse.parallel.state import single_process_model_parallel
    from megatron_qsparse.training.checkpoint import STATE_FILE

    with atomic_directory(output) as tmp:
        with single_process_model_parallel():
            model = build_gpt_model(cfg, cfg.to_transformer_config())
            model.load_state_dict(state, strict=False)
            missing = [k for k in model.state_dict() if k not in state and not k.endswith("_extra_state")]
            if missing:
                raise RuntimeError(f"missing tensors for {missing[:5]}...")
            (tmp / "model").mkdir()
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        model_dict = dict(cfg.to_dict(), preset="imported")
        write_json(tmp / STATE_FILE, {"step": 0, "source": source, "layout": {"tp": 1, "pp": 1, "ep": 1, "sp": False},
                                      "world_size": 1, "config": {"model": model_dict}, "format": 1})
    return Path(output)


def export_checkpoint(checkpoint: Path, output: Path, tokenizer: Optional[Path] = None, stock_format: bool = False,
                      log=print) -> Path:
    state, cfg, trainer_state = load_megatron_state(checkpoint)
    log(f"loaded {checkpoint}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, sparsity {cfg.sparsity.ratios()}"
        f"{', BitNet' if cfg.bitnet else ''}{f', {cfg.num_experts} experts' if cfg.num_experts else ''}")
    if tokenizer is None:
        candidate = (trainer_state["config"].get("data") or {}).get("tokenizer")
        tokenizer = Path(candidate) if candidate and Path(candidate).is_dir() else None
    return save_hf_model(state, cfg, output, tokenizer, stock_format, log)


def import_stock(hf_dir: Path, output: Path, log=print) -> Path:
    """A dense Llama / Mistral / Qwen2 directory -> our checkpoint (and its tokenizer beside it)."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    cfg = config_from_stock(config, str(hf_dir / "config.json"))
    stock = read_safetensors_dir(hf_dir)
    if cfg.tie_embeddings:
        stock.pop("lm_head.weight", None)
    state = hf_to_megatron(stock_to_hf(stock, cfg), cfg)
    log(f"{config['model_type']}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.query_groups}, vocab {cfg.vocab_size}")
    out = save_megatron_checkpoint(state, cfg, output, source=str(hf_dir))
    if (hf_dir / "tokenizer_config.json").exists() or (hf_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True).save_pretrained(out / "tokenizer")
    log(f"wrote {out} (use it as train.init_from; model section: {json.dumps(cfg.to_dict())})")
    return out
