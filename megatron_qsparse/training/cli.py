"""``qsparse-pretrain`` / ``pretrain_scripts/pretrain_qsparse.py``: train from a YAML config.

    torchrun --nproc_per_node 4 pretrain_scripts/pretrain_qsparse.py --config pretrain_scripts/configs/tiny-cpu.yaml \\
        --set parallel.tp=2 --set parallel.pp=2

Run with plain ``python`` for a single process. Exit codes: 0 done, 2 configuration error (reported before any
process group starts), 3 aborted after too many non-finite losses, 75 stopped by SIGTERM/SIGUSR1 after writing a
checkpoint (resume by running the same command again).
"""

import argparse
import json
import os
import sys
from datetime import timedelta

from megatron_qsparse.training.config import ConfigError, load_config

DEFAULT_CONFIG = "pretrain_scripts/configs/tiny-cpu.yaml"


def _init_process_group() -> None:
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:  # plain `python`: a one-process group on the loopback
        from megatron_qsparse.parallel.ports import free_port

        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("QSPARSE_DIST_TIMEOUT_MIN", 30))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train a Q-Sparse model (pretraining, continue-training, SFT).")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=50 --set model.sparsity.fc2=0.8",
    )
    parser.add_argument("--check", action="store_true", help="validate the config for WORLD_SIZE and exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides).validate(world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0

    from megatron_qsparse.parallel import cpu_compat

    cpu_compat.silence_gpu_stack_notices()
    from megatron_qsparse.training.trainer import Trainer, TrainingStopped

    cpu_compat.apply()
    _init_process_group()
    try:
        summary = Trainer(cfg).train()
    except TrainingStopped as stop:
        return stop.code
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print("summary " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
