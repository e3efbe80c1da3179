"""The export and import workflows used by ``tools/convert_*_hf.py``: our checkpoint -> a Hugging Face directory
(our ``qsparse`` model type, or a stock Llama for dense models), and a stock Llama / Mistral / Qwen2 directory ->
our checkpoint. The config and tensor mappings they apply: ``config_mapping.py`` and ``weights.py``. Every output
directory is written atomically (``megatron_qsparse.atomic``) and an existing non-empty one is refused.
"""

import contextlib
import errno
import importlib
import inspect
import json
from pathlib import Path
from typing import Iterator, Optional

from megatron_qsparse.atomic import atomic_directory, temporary_sibling, write_json
from megatron_qsparse.errors import EXIT_CANT_CREATE, CheckpointError, DataError, UserError, os_error
from megatron_qsparse.hf.config_mapping import config_from_stock, hf_config_from, stock_config_from
from megatron_qsparse.hf.weights import (
    Tensors,
    hf_to_megatron,
    hf_to_stock,
    megatron_to_hf,
    read_safetensors_dir,
    stock_to_hf,
)
from megatron_qsparse.model.checkpoint import (
    STATE_FILE,
    load_model,
    read_model_config,
    read_trainer_state,
    resolve_checkpoint,
)
from megatron_qsparse.model.config import QSparseConfig
from megatron_qsparse.model.manifest import write_manifest
from megatron_qsparse.progress import progress

# ---- inputs and the output directory: one-line errors that name the path --------------------------------------
# How safetensors (Rust) and torch word ENOSPC when they raise without an errno.
DISK_FULL_MARKERS = ("No space left on device", "StorageFull", "os error 28")


class OutputExistsError(UserError):
    """The output directory already holds something; it is never overwritten."""

    exit_code = EXIT_CANT_CREATE


def input_checkpoint(path: Path) -> Path:
    """The checkpoint to read: ``path`` itself or the newest complete one under it. A path that does not exist
    is a missing input (exit 66); a directory without a complete checkpoint is bad data (exit 65)."""
    path = Path(path)
    if not path.exists():
        raise os_error(errno.ENOENT, path)
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as err:
        if err.errno is not None:
            raise
        raise CheckpointError(str(err)) from None


def input_directory(path: Path, required_file: Optional[str] = None) -> Path:
    """An input directory that exists (and holds ``required_file``), else the OSError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise os_error(errno.ENOENT if not path.exists() else errno.ENOTDIR, path)
    if required_file and not (path / required_file).is_file():
        raise os_error(errno.ENOENT, path / required_file)
    return path


def _input_tokenizer(path: Path) -> None:
    from megatron_qsparse.data.tokenizer import TOKENIZER_FILES

    if not any((input_directory(path) / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"--tokenizer {path}: not a tokenizer directory (none of {', '.join(TOKENIZER_FILES)})")


def check_output_directory(output: Path) -> None:
    """Fail now, before a slow load, if ``output`` cannot be written: it exists and is not empty (73), a parent
    is a file (66, the file named), or its location refuses a new directory (73 read-only or permission denied,
    74 full)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(f"{output} exists and is not empty; choose a new output directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(output, "probe")
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        in_the_way = next((p for p in output.absolute().parents if p.exists() and not p.is_dir()), None)
        if in_the_way is not None:
            raise os_error(errno.ENOTDIR, in_the_way) from None
        raise os_error(err.errno, output) from None


@contextlib.contextmanager
def writing_output(output: Path) -> Iterator[None]:
    """Errors while writing ``output`` name it, not its hidden staging sibling; a full disk reported by a
    library without an errno (safetensors, torch) becomes the ENOSPC it is."""
    output = Path(output)
    try:
        yield
    except FileExistsError as err:
        if err.errno is None:  # atomic_directory's refusal of a non-empty output
            raise OutputExistsError(str(err)) from None
        raise
    except OSError as err:
        if err.errno is None or not _about_output(err, output):
            raise
        raise os_error(err.errno, output) from None
    except Exception as err:
        if _disk_full(err):
            raise os_error(errno.ENOSPC, output) from None
        raise


def _about_output(err: OSError, output: Path) -> bool:
    """Whether ``err`` is about ``output`` or its staging sibling (``.NAME.tmp-...``), not about an input."""
    if not err.filename:
        return True
    path = Path(err.filename).absolute()
    target = output.absolute()
    return (
        path == target
        or target in path.parents
        or any(p.name.startswith(f".{target.name}.") for p in [path, *path.parents])
    )


def _disk_full(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(err) for marker in DISK_FULL_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


# ---- progress: tensors converted of the total -------------------------------------------------------------------
class _CountedTensors(dict):
    """A state dict that advances a progress bar each time a mapping reads one of its tensors: the mappings of
    ``weights.py`` read every tensor they convert once, by key, so the count is the tensors converted so far."""

    def __init__(self, state: Tensors, bar):
        super().__init__(state)
        self.bar = bar

    def __getitem__(self, key):
        tensor = super().__getitem__(key)
        self.bar.update(1)
        return tensor


def _converted(mapping, state: Tensors, cfg: QSparseConfig, desc: str) -> Tensors:
    """``mapping(state, cfg)`` with a progress display over the tensors it converts (one per model key)."""
    from megatron_qsparse.hf.weights import _key_map

    with progress(total=len(_key_map(cfg)), desc=desc, unit="tensor") as bar:
        return mapping(_CountedTensors(state, bar), cfg)


# ---- export --------------------------------------------------------------------------------------------------
def _inlined_ops_source() -> str:
    """The project's top-K and quantizer modules, verbatim, as the exported ``qsparse_ops.py``."""
    from megatron_qsparse.hf import qsparse_ops

    parts = [
        '"""Copied at export from megatron_qsparse ('
        + ", ".join(qsparse_ops.EXPORTED_MODULES)
        + '): the same code that trained this model."""\n'
    ]
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


def save_hf_model(
    state: Tensors,
    cfg: QSparseConfig,
    output: Path,
    tokenizer: Optional[Path] = None,
    stock_format: bool = False,
    log=print,
) -> Path:
    """Write an HF checkpoint (safetensors + config + code files + tokenizer) atomically into ``output``."""
    from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM

    with writing_output(output), atomic_directory(output) as tmp:
        hf_state = _converted(megatron_to_hf, state, cfg, "export: converting tensors")
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
            # Replaces the package's re-export: the export's remote code then needs only torch and transformers.
            (tmp / "qsparse_ops.py").write_text(_inlined_ops_source())
        if tokenizer is not None:
            _copy_tokenizer(tokenizer, tmp)
    log(f"wrote {output}")
    return output


def _copy_tokenizer(source: Path, directory: Path) -> None:
    """Re-save the tokenizer in ``source`` into ``directory``, loadable by transformers 4.x as well as 5
    (``data.tokenizer.save_tokenizer``): the exports are read by tools pinned to either."""
    from transformers import AutoTokenizer

    from megatron_qsparse.data.tokenizer import save_tokenizer

    save_tokenizer(AutoTokenizer.from_pretrained(str(source), local_files_only=True), directory)


def _save_stock(hf_state: Tensors, cfg: QSparseConfig, directory: Path) -> None:
    if any(r > 0 for r in cfg.sparsity.ratios().values()) or cfg.bitnet or cfg.num_experts:
        raise ValueError(
            "--format llama is for dense models only: a sparse or BitNet model exported as a stock "
            "Llama would silently run dense; export it as qsparse"
        )
    from safetensors.torch import save_file

    stock_config_from(cfg).save_pretrained(directory)
    save_file(
        {k: v.contiguous() for k, v in hf_to_stock(hf_state, cfg).items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )


def export_checkpoint(
    checkpoint: Path, output: Path, tokenizer: Optional[Path] = None, stock_format: bool = False, log=print
) -> Path:
    # The cheap checks first: verifying and loading a large checkpoint takes minutes.
    if not Path(checkpoint).exists():
        raise os_error(errno.ENOENT, checkpoint)
    if tokenizer is not None:
        _input_tokenizer(tokenizer)
    check_output_directory(output)
    state, cfg, trainer_state = load_megatron_state(checkpoint)
    log(
        f"loaded {checkpoint}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, sparsity {cfg.sparsity.ratios()}"
        f"{', BitNet' if cfg.bitnet else ''}{f', {cfg.num_experts} experts' if cfg.num_experts else ''}"
    )
    if tokenizer is None:
        candidate = (trainer_state["config"].get("data") or {}).get("tokenizer")
        tokenizer = Path(candidate) if candidate and Path(candidate).is_dir() else None
    return save_hf_model(state, cfg, output, tokenizer, stock_format, log)


# ---- import --------------------------------------------------------------------------------------------------
def import_stock(hf_dir: Path, output: Path, log=print) -> Path:
    """A dense Llama / Mistral / Qwen2 directory -> our checkpoint (and its tokenizer beside it)."""
    hf_dir = Path(hf_dir)
    config = read_stock_config(hf_dir)
    cfg = config_from_stock(config, str(hf_dir / "config.json"))
    check_output_directory(output)
    stock = _read_stock_weights(hf_dir)
    if cfg.tie_embeddings:
        stock.pop("lm_head.weight", None)
    state = _converted(hf_to_megatron, stock_to_hf(stock, cfg), cfg, "import: converting tensors")
    log(
        f"{config['model_type']}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.query_groups}, vocab {cfg.vocab_size}"
    )
    out = save_megatron_checkpoint(state, cfg, output, source=str(hf_dir))
    if (hf_dir / "tokenizer_config.json").exists() or (hf_dir / "tokenizer.json").exists():
        _copy_tokenizer(hf_dir, out / "tokenizer")
    log(f"wrote {out} (use it as train.init_from; model section: {json.dumps(cfg.to_dict())})")
    return out


def read_stock_config(hf_dir: Path) -> dict:
    """``hf_dir/config.json`` as a dict; not JSON (or not an object) is bad input, named by file."""
    path = input_directory(hf_dir, "config.json") / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a Hugging Face config ({err}); point --hf at a model directory") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: not a Hugging Face config (expected a JSON object)")
    return config


def _read_stock_weights(hf_dir: Path) -> Tensors:
    try:
        return read_safetensors_dir(hf_dir)
    except FileNotFoundError as err:
        if err.errno is not None:
            raise
        raise DataError(str(err)) from None  # a model directory without safetensors weights


# ---- megatron side (one process, TP=PP=EP=1: dist checkpoints reshard on load) ---------------------------------
def load_megatron_state(checkpoint: Path):
    """(state dict, model config, trainer state) of a checkpoint written under any TP/PP/EP layout."""
    from megatron_qsparse.model.gpt import build_gpt_model
    from megatron_qsparse.parallel.state import single_process_model_parallel

    path = input_checkpoint(checkpoint)
    trainer_state = read_trainer_state(path)
    cfg = read_model_config(path)
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

    with writing_output(output), atomic_directory(output) as tmp:
        with single_process_model_parallel():
            model = build_gpt_model(cfg, cfg.to_transformer_config())
            model.load_state_dict(state, strict=False)
            missing = [k for k in model.state_dict() if k not in state and not k.endswith("_extra_state")]
            if missing:
                raise RuntimeError(f"missing tensors for {missing[:5]}...")
            (tmp / "model").mkdir()
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        write_manifest(tmp)  # checksums, so a damaged import is caught like a damaged training checkpoint
        model_dict = dict(cfg.to_dict(), preset="imported")
        write_json(
            tmp / STATE_FILE,
            {
                "step": 0,
                "source": source,
                "layout": {"tp": 1, "pp": 1, "ep": 1, "sp": False},
                "world_size": 1,
                "config": {"model": model_dict},
                "format": 1,
            },
        )
    return Path(output)
