"""The training configuration: one YAML file (``pretrain_scripts/configs/*.yaml``) plus ``--set`` overrides.

Sections: ``model`` (a preset name plus any ``QSparseConfig`` field), ``parallel``, ``data``, ``batch``,
``optimizer``, ``schedule``, ``train``, ``checkpoint``, ``log``. Every check that can be made without processes
(ratios, divisibility by TP/PP/EP, batch arithmetic against the world size, block size against the TP shard,
files that must exist) runs in ``validate`` before any process group starts, and names the key to fix.

Values, from the file and from ``--set`` alike, are converted to the types of the dataclass fields below
(``megatron_qsparse.config_types``: ``lr: 3e-3``, which YAML 1.1 reads as a string, becomes a float; ``steps: abc``
is refused naming ``train.steps``), and ``RANGES`` holds the bounds a value must respect to not fail later.
"""

import copy
import dataclasses
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Union

import yaml

from megatron_qsparse.config_types import ConfigError, build, coerce
from megatron_qsparse.model.config import PRESETS, QSparseConfig, apply_overrides
from megatron_qsparse.parallel.layout import ParallelLayout


@dataclass
class DataConfig:
    """``train``/``valid`` are blends of .bin/.idx prefixes, in any of three forms (``TrainConfig.blend``):
    ``[prefix, ...]`` (equal weights), ``[[weight, prefix], ...]``, or Megatron-LM's flat ``--data-path`` list
    ``[weight, prefix, weight, prefix, ...]`` (``[0.3, data/a_text_document, 0.7, data/b_text_document]``).

    ``split`` is Megatron-LM's ``--split``: ``"969,30,1"`` (or ``[969, 30, 1]``) divides the documents of
    ``train`` into train/valid/test parts in those proportions; the valid part is the held-out set, so ``valid``
    stays empty (set one or the other), and the test part is held out unread. None: all of ``train`` trains."""

    tokenizer: Optional[str] = None  # a Hugging Face tokenizer directory
    train: List = field(default_factory=list)  # prefixes, [weight, prefix] pairs, or a flat [w, prefix, ...] blend
    valid: List = field(default_factory=list)  # held-out prefixes (evaluation), same forms
    split: Union[str, List, None] = None  # "train,valid,test" proportions of data.train's documents, e.g. "969,30,1"
    sft: Optional[str] = None  # prompt/response JSON lines for train.mode=sft
    sft_valid: Optional[str] = None
    prompt_key: str = "prompt"
    response_key: str = "response"
    cache_dir: Optional[str] = None  # GPTDataset index cache (default: <run_dir>/data_cache)


@dataclass
class BatchConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    zero_stage: Optional[int] = None  # default: 2 without pipeline parallelism, 1 with it


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | polynomial | two_stage
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # default: train.steps
    power: float = 1.0  # polynomial decay exponent
    stage2_at: float = 0.5  # two_stage: fraction of train.steps where stage 2 starts
    stage2_lr: Optional[float] = None  # two_stage: peak LR of stage 2 (then cosine to min_lr)
    stage2_weight_decay: float = 0.0


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 1234
    mode: str = "pretrain"  # pretrain | continue | sft
    init_from: Optional[str] = None  # checkpoint directory (continue / sft): model weights only
    sparsity_ramp_steps: int = 0  # continue-training: sparsity grows linearly from 0 to its target
    max_nonfinite_steps: int = 5  # abort after this many consecutive NaN/Inf losses
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    init_std: float = 0.02


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    interval: int = 0  # 0: only at the end and on a signal
    keep: int = 2  # complete checkpoints kept (older ones removed); 0: keep every one
    resume: bool = True  # continue from <dir>/latest when present
    verify: bool = True  # verify the checksums of the checkpoint resumed from; false checks sizes only
    # Interval checkpoints written in the background while training goes on (megatron-core's async save); the
    # final checkpoint and the one on a stop signal are written before the run exits.
    async_save: bool = False


@dataclass
class LogConfig:
    run_dir: str = "runs/default"
    interval: int = 10
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_iters: int = 4
    tensorboard: bool = True


def _at_least(low):
    return (lambda v: v >= low), f"must be >= {low}"


def _above(low):
    return (lambda v: v > low), f"must be > {low}"


def _within(low, high):  # [low, high)
    return (lambda v: low <= v < high), f"must lie in [{low}, {high})"


# key -> (test, rule): values outside these bounds pass the types but break a later step (a division by zero, an
# empty batch, Adam with a string or a negative rate, an RNG that refuses the seed). None ("use the default") passes.
RANGES = {
    "batch.micro_batch_size": _at_least(1),
    "batch.global_batch_size": _at_least(1),
    "optimizer.lr": _above(0),
    "optimizer.min_lr": _at_least(0),
    "optimizer.beta1": _within(0, 1),
    "optimizer.beta2": _within(0, 1),
    "optimizer.eps": _above(0),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.clip_grad": _at_least(0),  # 0: no clipping
    "schedule.warmup_steps": _at_least(0),
    "schedule.decay_steps": _at_least(1),
    "schedule.power": _above(0),
    "schedule.stage2_lr": _above(0),
    "schedule.stage2_weight_decay": _at_least(0),
    "train.steps": _at_least(1),
    "train.seed": _within(0, 2**32),  # numpy's RandomState (dataset shuffling) takes 32-bit seeds
    "train.sparsity_ramp_steps": _at_least(0),
    "train.max_nonfinite_steps": _at_least(1),
    "train.init_std": _above(0),
    "checkpoint.interval": _at_least(0),
    "checkpoint.keep": _at_least(0),
    "log.interval": _at_least(1),
    "log.eval_interval": _at_least(0),
    "log.eval_iters": _at_least(1),
}


SECTIONS = {
    "parallel": ParallelLayout,
    "data": DataConfig,
    "batch": BatchConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "train": TrainSection,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


@dataclass
class TrainConfig:
    model: QSparseConfig
    model_preset: str
    parallel: ParallelLayout
    data: DataConfig
    batch: BatchConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainSection
    checkpoint: CheckpointConfig
    log: LogConfig
    source: str = "<dict>"

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.log.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def zero_stage(self) -> int:
        return self.optimizer.zero_stage or (1 if self.parallel.pp > 1 else 2)

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.batch.global_batch_size // (self.batch.micro_batch_size * dp)

    def to_dict(self) -> dict:
        out = {"model": dict(self.model.to_dict(), preset=self.model_preset)}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    # ---- checks --------------------------------------------------------------------------------------
    def validate(self, world_size: int) -> "TrainConfig":
        def need(ok, key, message):
            if not ok:
                raise ConfigError(f"{self.source}: {key}: {message}")

        for key, (test, rule) in RANGES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            need(value is None or test(value), key, rule)
        p, b = self.parallel, self.batch
        try:  # the layout's own checks, then what the model's shapes admit under it
            dp = p.data_parallel_size(world_size)
            self.model.to_transformer_config(p.tp, p.pp, p.ep, p.sp, virtual_pipeline_model_parallel_size=p.vpp)
        except ValueError as err:
            raise ConfigError(f"{self.source}: {err}") from None
        need(
            b.global_batch_size % (b.micro_batch_size * dp) == 0,
            "batch.global_batch_size",
            f"{b.global_batch_size} is not a multiple of micro_batch_size × data-parallel size = "
            f"{b.micro_batch_size} × {dp}",
        )
        micro = b.global_batch_size // (b.micro_batch_size * dp)
        need(
            p.vpp == 1 or micro % p.pp == 0,
            "batch.global_batch_size",
            f"interleaved 1F1B (parallel.vpp={p.vpp}) runs the microbatches in groups of pp = {p.pp}: "
            f"{micro} microbatches per step is not a multiple of {p.pp}",
        )
        need(self.zero_stage in (1, 2), "optimizer.zero_stage", "must be 1 or 2")
        need(
            not (self.zero_stage == 2 and p.pp > 1),
            "optimizer.zero_stage",
            "2 is not supported with pipeline parallelism (DeepSpeed); use 1",
        )
        s = self.schedule
        need(
            s.kind in ("cosine", "polynomial", "two_stage"),
            "schedule.kind",
            f"{s.kind!r} is not one of cosine, polynomial, two_stage",
        )
        need(0.0 < s.stage2_at < 1.0, "schedule.stage2_at", "must lie in (0, 1)")
        t = self.train
        need(t.mode in ("pretrain", "continue", "sft"), "train.mode", f"{t.mode!r} is not pretrain/continue/sft")
        need(
            t.mode == "pretrain" or t.init_from is not None or self._resumable(),
            "train.init_from",
            f"mode {t.mode} starts from a checkpoint: set train.init_from to a checkpoint directory",
        )
        if t.init_from:
            need(Path(t.init_from).exists(), "train.init_from", f"{t.init_from} does not exist")
        need(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"{t.dtype!r} is not auto/fp32/bf16")
        d = self.data
        need(
            d.tokenizer is not None and Path(d.tokenizer).is_dir(),
            "data.tokenizer",
            f"{d.tokenizer!r} is not a tokenizer directory (train one with tools/train_tokenizer.py)",
        )
        if t.mode == "sft":
            need(d.sft is not None and Path(d.sft).is_file(), "data.sft", f"{d.sft!r} is not a JSON-lines file")
        else:
            need(bool(d.train), "data.train", "no training data: list .bin/.idx prefixes (tools/preprocess_data.py)")
            if d.split is not None:
                split_weights(d.split, f"{self.source}: data.split")
                need(
                    not d.valid,
                    "data.split",
                    "holds out a part of data.train for evaluation, and data.valid names another held-out set: "
                    "choose one (data.split=null, or data.valid=[])",
                )
            for key in ("data.train", "data.valid"):
                for _, prefix in self.blend(getattr(d, key[5:]), key):
                    for ext in (".bin", ".idx"):
                        need(Path(prefix + ext).is_file(), key, f"{prefix}{ext} does not exist{_did_you_mean(prefix)}")
        return self

    def _resumable(self) -> bool:
        return self.checkpoint.resume and (self.checkpoint_dir / "latest").exists()

    def blend(self, entries, key) -> List[tuple]:
        """``[prefix, ...]``, ``[[weight, prefix], ...]`` or the flat ``[weight, prefix, weight, prefix, ...]`` of
        Megatron-LM's ``--data-path`` (megatron-core's ``get_blend_from_list``), as (weight, prefix) pairs.

        A list is flat when one of its entries is a number (or a numeric string, as megatron-core reads them);
        then it must alternate weight and prefix, every weight > 0."""
        if _is_flat_blend(entries):
            return self._flat_blend(entries, key)
        pairs = []
        for entry in entries:
            if isinstance(entry, str):
                pairs.append((1.0, entry))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
                pairs.append((self._weight(entry, key), entry[1]))
            else:
                raise ConfigError(f"{self.source}: {key}: entries are prefixes or [weight, prefix], got {entry!r}")
        return pairs

    def _flat_blend(self, entries, key) -> List[tuple]:
        where = f"{self.source}: {key}"
        if len(entries) % 2:
            raise ConfigError(
                f"{where}: a flat blend [weight, prefix, weight, prefix, ...] has an even number of entries, got "
                f"{len(entries)}: {entries!r}; give every prefix its weight"
            )
        pairs = []
        for position in range(0, len(entries), 2):
            weight, prefix = entries[position], entries[position + 1]
            if _number(weight) is None:
                raise ConfigError(
                    f"{where}: entry {position + 1} ({weight!r}) is not a number: a flat blend alternates "
                    f"weight, prefix (e.g. [0.3, data/a_text_document, 0.7, data/b_text_document])"
                )
            if not isinstance(prefix, str) or _number(prefix) is not None:
                raise ConfigError(
                    f"{where}: entry {position + 2} ({prefix!r}) is not a prefix: a flat blend alternates "
                    f"weight, prefix (e.g. [0.3, data/a_text_document, 0.7, data/b_text_document])"
                )
            pairs.append((self._weight((weight, prefix), key), prefix))
        return pairs

    def _weight(self, entry, key) -> float:
        try:
            weight = coerce(entry[0], float, key)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err} (the weight of {entry[1]})") from None
        if weight <= 0:
            raise ConfigError(f"{self.source}: {key}: the weight of {entry[1]} must be > 0, got {weight}")
        return weight


def _number(value) -> Optional[float]:
    """``value`` as a finite float when it is a number or a numeric string (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _is_flat_blend(entries) -> bool:
    return not any(isinstance(e, (list, tuple)) for e in entries) and any(_number(e) is not None for e in entries)


def split_weights(split, key: str = "data.split") -> List[float]:
    """Megatron-LM's ``--split`` (``"969,30,1"``, or a list of 3 numbers) as [train, valid, test] proportions;
    a ConfigError naming ``key`` unless it is 3 non-negative numbers, train's > 0 (so their sum is too)."""
    parts = split.split(",") if isinstance(split, str) else split
    if not isinstance(parts, (list, tuple)) or len(parts) != 3:
        raise ConfigError(f'{key}: {split!r} is not 3 proportions train,valid,test (e.g. "969,30,1" or [969, 30, 1])')
    weights = [_number(part.strip() if isinstance(part, str) else part) for part in parts]
    if any(w is None or w < 0 for w in weights):
        raise ConfigError(f"{key}: {split!r}: each of train,valid,test must be a number >= 0")
    if weights[0] <= 0:  # megatron-core would build no training set (and a zero sum splits nothing)
        raise ConfigError(f"{key}: {split!r}: the train proportion must be > 0 (e.g. 969,30,1)")
    return weights


def _did_you_mean(prefix: str) -> str:
    """A hint for a prefix whose files are missing but that tools/preprocess_data.py --json-keys (Megatron-LM's
    naming) wrote at ``PREFIX_<key>_document``: "; did you mean PREFIX_text_document?"."""
    found = sorted(
        bin_path[: -len(".bin")]
        for bin_path in glob.glob(f"{glob.escape(prefix)}_*_document.bin")
        if Path(bin_path[: -len(".bin")] + ".idx").is_file()
    )
    if not found:
        return ""
    text_first = sorted(found, key=lambda p: not p.endswith("_text_document"))
    return (
        f"; did you mean {' or '.join(text_first[:3])}? (preprocess_data.py --json-keys writes "
        f"PREFIX_<key>_document.bin/.idx, as Megatron-LM's does)"
    )


def build_config(data: dict, overrides: Iterable[str] = (), source: str = "<dict>") -> TrainConfig:
    """A TrainConfig from nested data (as read from YAML) and ``dotted.key=value`` overrides."""
    data = copy.deepcopy(data)
    unknown = sorted(set(data) - set(SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; sections are {['model'] + sorted(SECTIONS)}")
    model = dict(data.get("model") or {})
    preset_name = model.pop("preset", "tiny")
    # A preset override replaces the base the model section starts from (its other keys still apply).
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        if key == "model.preset":
            preset_name = value
    if preset_name not in PRESETS:
        raise ConfigError(f"{source}: model.preset: {preset_name!r} is not one of {sorted(PRESETS)}")
    model_data = PRESETS[preset_name]().to_dict()
    _merge(model_data, model, f"{source}: model")
    full = {"model": dict(model_data, preset=preset_name)}
    for name, cls in SECTIONS.items():
        section = dataclasses.asdict(cls())
        _merge(section, data.get(name) or {}, f"{source}: {name}")
        full[name] = section
    try:
        apply_overrides(full, overrides)
        preset_name = full["model"].pop("preset")
        model_cfg = QSparseConfig.from_dict(full["model"], where="model")
        sections = {name: build(cls, full[name], name) for name, cls in SECTIONS.items()}
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {err}") from None
    return TrainConfig(model=model_cfg, model_preset=preset_name, source=source, **sections)


def load_config(path, overrides: Iterable[str] = ()) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see pretrain_scripts/configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return build_config(data, overrides, source=str(path))


def _merge(base: dict, update: dict, where: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value
