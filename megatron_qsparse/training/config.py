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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

import yaml

from megatron_qsparse.config_types import ConfigError, build, coerce
from megatron_qsparse.model.config import PRESETS, QSparseConfig, apply_overrides
from megatron_qsparse.parallel.layout import ParallelLayout


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None  # a Hugging Face tokenizer directory
    train: List = field(default_factory=list)  # prefixes, or [weight, prefix] pairs for a blend
    valid: List = field(default_factory=list)  # held-out prefixes (evaluation)
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
            self.model.to_transformer_config(p.tp, p.pp, p.ep, p.sp)
        except ValueError as err:
            raise ConfigError(f"{self.source}: {err}") from None
        need(
            b.global_batch_size % (b.micro_batch_size * dp) == 0,
            "batch.global_batch_size",
            f"{b.global_batch_size} is not a multiple of micro_batch_size × data-parallel size = "
            f"{b.micro_batch_size} × {dp}",
        )
        need(self.zero_stage in (1, 2), "optimizer.zero_stage", "must be 1 or 2")
        need(
            not (self.zero_stage == 2 and p.pp > 1),
            "optimizer.zero_stage",
            "2 is not supported with pipeline parallelism (DeepSpeed); use 1",
        )
        need(
            not (self.model.tie_embeddings and p.pp > 1),
            "model.tie_embeddings",
            "tied embeddings are not supported with pipeline parallelism here; set model.tie_embeddings=false",
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
            for _, prefix in self.blend(d.train, "data.train") + self.blend(d.valid, "data.valid"):
                for ext in (".bin", ".idx"):
                    need(Path(prefix + ext).is_file(), "data", f"{prefix}{ext} does not exist")
        return self

    def _resumable(self) -> bool:
        return self.checkpoint.resume and (self.checkpoint_dir / "latest").exists()

    def blend(self, entries, key) -> List[tuple]:
        """``[prefix, ...]`` or ``[[weight, prefix], ...]`` as (weight, prefix) pairs."""
        pairs = []
        for entry in entries:
            if isinstance(entry, str):
                pairs.append((1.0, entry))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
                pairs.append((self._weight(entry, key), entry[1]))
            else:
                raise ConfigError(f"{self.source}: {key}: entries are prefixes or [weight, prefix], got {entry!r}")
        return pairs

    def _weight(self, entry, key) -> float:
        try:
            weight = coerce(entry[0], float, key)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err} (the weight of {entry[1]})") from None
        if weight <= 0:
            raise ConfigError(f"{self.source}: {key}: the weight of {entry[1]} must be > 0, got {weight}")
        return weight


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
