"""Learning-rate, weight-decay and sparsity schedules: pure functions of the step (0-based, before update)."""

import math
from typing import Tuple

from megatron_qsparse.training.config import OptimizerConfig, ScheduleConfig


def _decay(progress: float, kind: str, power: float) -> float:
    """Multiplier from 1 (progress 0) to 0 (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "polynomial":
        return (1.0 - progress) ** power
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_and_weight_decay(step: int, total_steps: int, opt: OptimizerConfig, s: ScheduleConfig) -> Tuple[float, float]:
    """Linear warmup to ``opt.lr``, then cosine or polynomial decay to ``opt.min_lr`` over ``decay_steps``.
    ``two_stage`` (BitNet b1.58): cosine from ``lr`` during stage 1; at ``stage2_at·total`` the LR restarts
    at ``stage2_lr`` and decays to ``min_lr``, and weight decay drops to ``stage2_weight_decay``."""
    if s.warmup_steps and step < s.warmup_steps:
        return opt.lr * (step + 1) / s.warmup_steps, opt.weight_decay
    if s.kind == "two_stage":
        boundary = int(s.stage2_at * total_steps)
        if step < boundary:
            progress = (step - s.warmup_steps) / max(boundary - s.warmup_steps, 1)
            stage2_peak = s.stage2_lr if s.stage2_lr is not None else opt.lr
            return stage2_peak + (opt.lr - stage2_peak) * _decay(progress, "cosine", 1.0), opt.weight_decay
        peak = s.stage2_lr if s.stage2_lr is not None else opt.lr
        progress = (step - boundary) / max(total_steps - boundary, 1)
        return opt.min_lr + (peak - opt.min_lr) * _decay(progress, "cosine", 1.0), s.stage2_weight_decay
    decay_steps = s.decay_steps or total_steps
    progress = (step - s.warmup_steps) / max(decay_steps - s.warmup_steps, 1)
    return opt.min_lr + (opt.lr - opt.min_lr) * _decay(progress, s.kind, s.power), opt.weight_decay


def sparsity_scale(step: int, ramp_steps: int) -> float:
    """Continue-training ramp: the fraction of each site's target sparsity in force at ``step``."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, step / ramp_steps)
