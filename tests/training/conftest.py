"""Run the training command exactly as users do (``torchrun ... pretrain_scripts/pretrain_qsparse.py``) on the
shared ``corpus`` fixture (tests/conftest.py), and read what it wrote."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]

# The test model: 2 layers, hidden 64, Q-Sparse 50% (fc2 80%), GQA, untied (so PP layouts apply).
MODEL = {
    "preset": "tiny",
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "vocab_size": 2048,
    "seq_length": 64,
    "tie_embeddings": False,
    "sparsity": {"default": 0.5, "fc2": 0.8},
}


def write_config(path: Path, corpus: dict, run_dir: Path, **sections) -> Path:
    config = {
        "model": dict(MODEL),
        "data": {"tokenizer": corpus["tokenizer"], "train": [corpus["train"]], "valid": [corpus["valid"]]},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4},
        "schedule": {"warmup_steps": 2},
        "train": {"steps": 20},
        "checkpoint": {"interval": 0},
        "log": {"run_dir": str(run_dir), "interval": 1, "eval_interval": 0, "eval_iters": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, nproc: int = 1, overrides=()) -> list:
    script = [str(REPO / "pretrain_scripts" / "pretrain_qsparse.py"), "--config", str(config)]
    script += [a for o in overrides for a in ("--set", o)]
    if nproc == 1:
        return [sys.executable] + script
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + script


def environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))


def run_training(config: Path, nproc: int = 1, overrides=(), timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(config, nproc, overrides), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    return proc


def start(config: Path, nproc: int = 1, overrides=()) -> subprocess.Popen:
    """The training command in the background, in its own session (as a scheduler starts a job)."""
    return subprocess.Popen(
        command(config, nproc, overrides),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process under it, as a node failure would (torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running)."""
    launcher = psutil.Process(proc.pid)
    for process in [*launcher.children(recursive=True), launcher]:
        process.send_signal(signal.SIGKILL)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (exit {proc.returncode}) before the condition: {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError("timed out waiting for the run")


def seed_with_checkpoint(saved: Path, run_dir: Path) -> None:
    """A new run directory whose newest checkpoint is a copy of ``saved``: a run there resumes from it."""
    target = run_dir / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(saved, target / saved.name)
    (target / "latest").write_text(saved.name + "\n")


def resumed_loss_gaps(reference_dir: Path, run_dir: Path, first_step: int, last_step: int) -> list:
    """Relative loss gaps of a resumed run (steps ``first_step``..``last_step``, each once) to the reference run."""
    reference = {m["step"]: m["loss"] for m in metrics(reference_dir)}
    resumed = metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(first_step, last_step + 1))
    return [abs(m["loss"] - reference[m["step"]]) / abs(reference[m["step"]]) for m in resumed]


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> list:
    return [m["loss"] for m in metrics(run_dir)]


def assert_same_trajectory(reference_dir: Path, run_dir: Path, steps: int) -> None:
    """Every step's loss and gradient norm equal the reference run's: within 2e-6 relative at step 1 (same
    weights, same batch: only the order of sums differs), then 2e-4 on the loss and 2e-3 on the gradient norm
    (a top-K selection near a tie can flip between layouts and the trajectories drift apart slowly)."""
    reference, run = metrics(reference_dir), metrics(run_dir)
    assert len(reference) == len(run) == steps
    for key, first_tol, tol in (("loss", 2e-6, 2e-4), ("grad_norm", 2e-6, 2e-3)):
        for step, (a, b) in enumerate(zip(reference, run), 1):
            bound = (first_tol if step == 1 else tol) * abs(a[key])
            assert abs(a[key] - b[key]) <= bound, f"{run_dir.name} step {step} {key}: {b[key]} vs {a[key]}"


GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def one_rank_group():
    """A one-rank gloo group in this process (reused if one exists), its environment restored afterwards so that
    training subprocesses started later do not inherit it."""
    import torch.distributed as dist

    from megatron_qsparse.parallel.ports import free_port

    saved = {k: os.environ.get(k) for k in GROUP_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
