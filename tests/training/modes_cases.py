"""In-process trainer runs (inside tests/distributed/launch.run_workers) for behaviour that needs hooks."""

import torch

from megatron_qsparse.training import trainer as trainer_module
from megatron_qsparse.training.config import load_config


def nonfinite_run(rank, world_size, config_path, nan_steps, max_nonfinite):
    """Losses at ``nan_steps`` (1-based) become NaN; report whether skipped steps left parameters and
    optimizer state untouched, and how the run ended."""
    cfg = load_config(config_path, [f"train.max_nonfinite_steps={max_nonfinite}"])
    calls = {"n": 0}
    real_mean = trainer_module.global_mean_loss

    def poisoned(local):
        calls["n"] += 1
        value = real_mean(local)
        return float("nan") if calls["n"] in nan_steps else value

    trainer_module.global_mean_loss = poisoned
    trainer = trainer_module.Trainer(cfg)
    untouched = []
    real_skip = trainer._skip_step

    def checked_skip():
        params = [p.detach().clone() for p in trainer.model.parameters()]
        moments = (
            {k: v.clone() for k, v in trainer.engine.optimizer.optimizer.state_dict()["state"][0].items()}
            if trainer.engine.optimizer.optimizer.state
            else {}
        )
        real_skip()
        same_params = all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
        after = trainer.engine.optimizer.optimizer.state_dict()["state"].get(0, {})
        same_moments = all(torch.equal(v, after[k]) for k, v in moments.items())
        untouched.append(same_params and same_moments)

    trainer._skip_step = checked_skip
    try:
        trainer.train()
        exit_code = 0
    except trainer_module.TrainingStopped as stop:
        exit_code = stop.code
    finally:
        trainer_module.global_mean_loss = real_mean
    return {
        "untouched": untouched,
        "exit_code": exit_code,
        "grads_cleared": all(p.grad is None or not torch.isnan(p.grad).any() for p in trainer.model.parameters()),
        "finite_params": all(torch.isfinite(p).all() for p in trainer.model.parameters()),
    }
