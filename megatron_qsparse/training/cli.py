"""``qsparse-pretrain`` / ``pretrain_scripts/pretrain_qsparse.py``: train from a YAML config.

    qsparse-pretrain --config pretrain_scripts/configs/tiny-cpu.yaml --nproc-per-node 4 --set parallel.tp=2
    torchrun --nproc_per_node 4 pretrain_scripts/pretrain_qsparse.py --config ... --set parallel.pp=2

Plain ``python`` (or ``qsparse-pretrain``) runs one process; ``--nproc-per-node N`` validates the config once for
N processes and then starts them through torchrun on this machine. Under a launcher of your own (torchrun across
nodes, srun) a configuration error is printed by rank 0 only. Exit codes (docs/errors.md): 0 done, 2
configuration error (one line, before any process group starts), 3 aborted after too many non-finite losses,
65 a damaged or unsafe checkpoint, 73 the run directory is in use or cannot be written, 74 I/O error (e.g. no
space left), 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (run the same command again to resume),
130 stopped by Ctrl-C after writing a checkpoint.
"""

import argparse
import json
import os
import sys
from datetime import timedelta

from megatron_qsparse import errors

DEFAULT_CONFIG = "pretrain_scripts/configs/tiny-cpu.yaml"


def init_process_group() -> None:
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


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N trainer processes on this machine through torchrun (the config is checked once, first)",
    )
    return parser.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _report(err: BaseException) -> int:
    """One line from rank 0 (every rank exits with the same code); a bug keeps its traceback."""
    known = errors.exit_code_and_message(err)
    if known is None:
        raise err
    code, line = known
    if _rank() == 0:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def _launch(args: argparse.Namespace, argv) -> int:
    """``--nproc-per-node N``: torchrun --standalone with the same arguments, minus this option. Returns the first
    failed worker's exit code (its own message is above), without torchrun's failure report."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    module = "megatron_qsparse.training.cli"
    launch = ["--standalone", f"--nproc_per_node={args.nproc_per_node}", "-m", module, *rest]
    try:
        torchrun.run(torchrun.parse_args(launch))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15: killed by SIGTERM
        print(f"worker rank {rank} exited with code {code}", file=sys.stderr, flush=True)
        return code
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron_qsparse.parallel import cpu_compat

    cpu_compat.silence_gpu_stack_notices()  # before the config (it imports megatron-core): no GPU-stack warnings
    from megatron_qsparse.training.config import load_config

    world_size = args.nproc_per_node or int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        return _report(errors.UserError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}"))
    try:
        cfg = load_config(args.config, args.overrides).validate(world_size)
    except (errors.UserError, ValueError) as err:  # ConfigError is a ValueError
        return _report(err)
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if args.nproc_per_node is not None:
        return _launch(args, argv)
    return _train(cfg)


def _train(cfg) -> int:
    from megatron_qsparse.parallel import cpu_compat
    from megatron_qsparse.training.trainer import Trainer, TrainingStopped

    cpu_compat.apply()
    init_process_group()
    try:
        summary = Trainer(cfg).train()
    except TrainingStopped as stop:
        return stop.code
    except (OSError, ValueError, errors.UserError) as err:
        return _report(err)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint for the current step
        if _rank() == 0:
            print("interrupted: stopped without a checkpoint of the current step", file=sys.stderr, flush=True)
        return errors.EXIT_INTERRUPTED
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if _rank() == 0:
        print("summary " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
