"""A grid of ordinary training runs from one YAML file, resumable, collected into one results.csv.

    .venv/bin/python tools/sweep.py SWEEP.yaml [--jobs 2] [--list] [--index I] [--collect]

SWEEP.yaml::

    base: pretrain_scripts/configs/tiny-cpu.yaml   # the trainer config every run starts from
    output: runs/sweep-scaling                     # <output>/<run name>/ per run, <output>/results.csv
    set: [train.steps=120, log.eval_interval=0]    # overrides for every run
    grid:                                          # the runs: every combination of the axes' values
      size:                                        # a named axis: name -> overrides
        h64: [model.hidden_size=64, model.ffn_hidden_size=172]
        h128: [model.hidden_size=128, model.ffn_hidden_size=344]
      model.sparsity.default: [0.0, 0.4, 0.6]      # a dotted config key: its values
      model.bitnet: [false, true]
      train.seed: [1, 2]

A run is an ordinary ``pretrain_scripts/pretrain_qsparse.py`` call (``torchrun`` when ``processes > 1``) with its
run directory at ``<output>/<name>``; its output goes to ``train.log`` there. When it ends well the sweep writes
``result.json`` beside it, and that file is what makes it finished: a new call skips it. A run killed midway
resumes from its own last checkpoint (the trainer's resume), so a killed sweep continues where it stopped.
SIGTERM / Ctrl-C reach the running trainers, which checkpoint and stop; the sweep then exits 75.
Progress on stderr: the runs done of those to run, with an ETA at the pace of the runs finished so far.

results.csv, rewritten after every run: ``name, N, N_a, S, S_realized, loss, train_loss, tokens, bitnet,
block_size, seed, steps, wall_s`` plus one column per axis. N counts the block linear parameters, N_a the
activated ones at the configured ratios, S = 1 − N_a/N, S_realized the same with the measured input sparsity of
the last step, loss the held-out loss of the final evaluation. ``tools/fit_scaling_law.py`` reads it.

On Slurm, ``slurm/sweep.sh`` runs one grid point per array task (``--index $SLURM_ARRAY_TASK_ID``), and
``--collect`` rewrites results.csv from what the tasks finished.

Exit status (problems are one line on stderr naming the file or key): 0 every run finished, 1 a run failed (its
train.log says why), 2 a bad sweep file or run config, 66 the sweep file does not exist, 73 the output directory
cannot be created or written (read-only, permission denied), 74 no space left, 75 stopped by a signal (the
trainers checkpointed; run the same command again to resume).
"""

import argparse
import csv
import errno
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from megatron_qsparse.parallel.cpu_compat import silence_gpu_stack_notices  # noqa: E402

silence_gpu_stack_notices()

from megatron_qsparse import atomic  # noqa: E402
from megatron_qsparse.errors import EXIT_PREEMPTED, UserError, os_error, run_command  # noqa: E402
from megatron_qsparse.progress import LineProgress, progress  # noqa: E402

EXIT_STOPPED = EXIT_PREEMPTED
KEYS = {"base", "output", "set", "grid", "processes", "jobs"}
COLUMNS = ["name", "N", "N_a", "S", "S_realized", "loss", "train_loss", "tokens", "bitnet", "block_size", "seed"]
COLUMNS += ["steps", "wall_s"]


class SweepError(UserError, ValueError):
    """A sweep file or grid point that cannot run; the message names the file and the key."""


@dataclass
class Run:
    name: str
    axes: Dict[str, str]  # axis -> the value's label
    overrides: List[str]

    def directory(self, output: Path) -> Path:
        return output / self.name


@dataclass
class Sweep:
    source: Path
    base: Path
    output: Path
    common: List[str]
    runs: List[Run]
    processes: int = 1
    jobs: int = 1
    axes: List[str] = field(default_factory=list)


def _label(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.exists():
        raise os_error(errno.ENOENT, path)
    if not path.is_file():
        raise SweepError(f"{path}: not a file; give the sweep's YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SweepError(f"{path}: not valid YAML: {_one_line(err)}") from None
    unknown = sorted(set(data) - KEYS) if isinstance(data, dict) else ["<not a mapping>"]
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(KEYS)}")
    for key in ("base", "output", "grid"):
        if key not in data:
            raise SweepError(f"{path}: {key}: missing (see tools/sweep.py --help)")
    base = (REPO / data["base"]) if not Path(data["base"]).is_absolute() else Path(data["base"])
    if not base.is_file():
        raise SweepError(f"{path}: base: {data['base']} is not a file")
    grid = data["grid"]
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: grid: expected a mapping of axes to values")
    choices = []
    for axis, values in grid.items():
        if isinstance(values, dict):  # a named axis
            options = []
            for label, overrides in values.items():
                if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                    raise SweepError(f"{path}: grid.{axis}.{label}: expected a list of key=value overrides")
                options.append((str(label), list(overrides)))
        elif isinstance(values, list) and values and "." in axis:
            options = [(_label(v), [f"{axis}={_label(v)}"]) for v in values]
        else:
            raise SweepError(
                f"{path}: grid.{axis}: a dotted config key takes a list of values, any other name a mapping "
                "of labels to override lists"
            )
        choices.append([(axis, label, overrides) for label, overrides in options])
    runs = []
    for combination in itertools.product(*choices):
        axes = {axis: label for axis, label, _ in combination}
        name = ",".join(f"{axis.split('.')[-1]}={label}" for axis, label, _ in combination)
        runs.append(Run(name, axes, [o for _, _, overrides in combination for o in overrides]))
    output = Path(data["output"])
    output = output if output.is_absolute() else REPO / output
    common = list(data.get("set") or [])
    return Sweep(path, base, output, common, runs, int(data.get("processes", 1)), int(data.get("jobs", 1)), list(grid))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def check_output(sweep: Sweep) -> None:
    """The output directory exists and takes new files: an unwritable one is named before any run starts."""
    try:
        sweep.output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=sweep.output):
            pass
    except OSError as err:  # EEXIST: it, or a parent, is a file
        raise os_error(errno.ENOTDIR if err.errno == errno.EEXIST else err.errno, sweep.output) from None


def run_config(sweep: Sweep, run: Run):
    from megatron_qsparse.training.config import load_config

    overrides = sweep.common + run.overrides + [f"log.run_dir={run.directory(sweep.output)}"]
    return overrides, load_config(sweep.base, overrides)


def check_configs(sweep: Sweep) -> None:
    """Every run's config loads (unknown keys and bad values are named before anything starts)."""
    from megatron_qsparse.training.config import ConfigError

    for run in sweep.runs:
        try:
            run_config(sweep, run)[1].validate(sweep.processes)
        except ConfigError as err:
            raise SweepError(f"{sweep.source}: run {run.name}: {err}") from None


def command(sweep: Sweep, overrides: List[str]) -> List[str]:
    script = [str(REPO / "pretrain_scripts" / "pretrain_qsparse.py"), "--config", str(sweep.base)]
    script += [a for o in overrides for a in ("--set", o)]
    if sweep.processes == 1:
        return [sys.executable] + script
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sweep.processes}"] + (
        script
    )


def result_of(sweep: Sweep, run: Run, cfg, wall_s: float) -> dict:
    """The run's row, from its config and the metrics.jsonl its trainer wrote."""
    from megatron_qsparse.model.summary import summarize

    directory = run.directory(sweep.output)
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in records if not r.get("skipped")]
    evaluated = [r for r in trained if "eval" in r]
    if not trained or not evaluated:
        raise SweepError(f"{directory}/metrics.jsonl: no trained step with a held-out evaluation (data.valid set?)")
    summary = summarize(cfg.model)
    n, n_a = summary["block_linear_parameters_N"], summary["activated_parameters_N_a"]
    last = trained[-1]
    return dict(
        name=run.name,
        N=n,
        N_a=n_a,
        S=round(1.0 - n_a / n, 6),
        S_realized=round(1.0 - last["activated_params"] / n, 6),
        loss=evaluated[-1]["eval"]["loss"],
        train_loss=last["loss"],
        tokens=cfg.train.steps * cfg.batch.global_batch_size * cfg.model.seq_length,
        bitnet=cfg.model.bitnet,
        block_size=cfg.model.sparsity.block_size,
        seed=cfg.train.seed,
        steps=cfg.train.steps,
        wall_s=round(wall_s, 1),
        **{f"axis:{axis}": run.axes[axis] for axis in sweep.axes},
    )


def write_results(sweep: Sweep) -> Path:
    rows = []
    for run in sweep.runs:
        path = run.directory(sweep.output) / "result.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS + [f"axis:{a}" for a in sweep.axes], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(sweep.output / "results.csv", text.getvalue())
    return sweep.output / "results.csv"


class Runner:
    """Runs the unfinished grid points, ``jobs`` at a time, and forwards a stop signal to the running trainers."""

    def __init__(self, sweep: Sweep, jobs: int):
        self.sweep, self.jobs = sweep, jobs
        self.children: Dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.failed: List[str] = []

    def stop(self, signum, frame) -> None:
        self.stopping = True
        with self.lock:
            for child in self.children.values():
                child.send_signal(signal.SIGTERM)

    def run_one(self, position: int, run: Run) -> None:
        if self.stopping:
            return
        sweep, total = self.sweep, len(self.sweep.runs)
        directory = run.directory(sweep.output)
        directory.mkdir(parents=True, exist_ok=True)
        overrides, cfg = run_config(sweep, run)
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // self.jobs)))
        start = time.time()
        print(f"[{position}/{total}] {run.name}: started (log {directory / 'train.log'})", flush=True)
        with open(directory / "train.log", "a") as log:
            with self.lock:
                child = subprocess.Popen(command(sweep, overrides), cwd=REPO, env=env, stdout=log, stderr=log)
                self.children[run.name] = child
            code = child.wait()
            with self.lock:
                del self.children[run.name]
        wall = time.time() - start
        if code != 0:
            reason = "stopped, resumes on the next call" if code == EXIT_STOPPED else f"failed (exit {code})"
            print(
                f"[{position}/{total}] {run.name}: {reason} after {wall:.0f} s; see {directory / 'train.log'}",
                flush=True,
            )
            if code != EXIT_STOPPED:
                self.failed.append(run.name)
            return
        result = result_of(sweep, run, cfg, wall)
        atomic.write_json(directory / "result.json", result)
        with self.lock:
            write_results(sweep)
        print(
            f"[{position}/{total}] {run.name}: done in {wall:.0f} s: held-out loss {result['loss']:.4f}, "
            f"N {result['N'] / 1e6:.2f}M, S {result['S']:.3f} (realized {result['S_realized']:.3f})",
            flush=True,
        )

    def _run_counted(self, bar, position: int, run: Run) -> None:
        self.run_one(position, run)
        if not self.stopping:
            with self.lock:
                if self.failed:
                    bar.set_postfix_str(f"{len(self.failed)} failed")
                bar.update(1)

    def run(self, indices: List[int]) -> int:
        todo = [
            (i + 1, self.sweep.runs[i])
            for i in indices
            if not (self.sweep.runs[i].directory(self.sweep.output) / "result.json").is_file()
        ]
        skipped = len(indices) - len(todo)
        print(
            f"sweep {self.sweep.source}: {len(self.sweep.runs)} runs, {skipped} already finished, {len(todo)} to "
            f"run, {self.jobs} at a time, output {self.sweep.output}",
            flush=True,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        # Runs done of those to run, on stderr; the ETA is the remaining runs at the pace of the finished ones.
        with progress(total=len(todo), desc="sweep", unit="run") as bar:
            finished = False
            try:
                with ThreadPoolExecutor(self.jobs) as pool:
                    list(pool.map(lambda item: self._run_counted(bar, *item), todo))
                finished = not self.stopping
            finally:
                if not finished and isinstance(bar, LineProgress):
                    bar.abandon()  # a stopped or failed sweep is not done: no closing "done" line
        results = write_results(self.sweep)
        print(f"wrote {results}", flush=True)
        if self.stopping:
            return EXIT_STOPPED
        return 1 if self.failed else 0


def main(argv=None) -> int:
    return run_command(_main, argv, "sweep.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--jobs", type=int, help="runs at a time on this machine (default: the file's jobs, or 1)")
    parser.add_argument("--list", action="store_true", help="print the runs (index, name, finished) and exit")
    parser.add_argument("--index", type=int, action="append", help="run only this grid point (0-based; repeatable)")
    parser.add_argument("--collect", action="store_true", help="only rewrite results.csv from finished runs")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    check_configs(sweep)
    for index in args.index or []:
        if not 0 <= index < len(sweep.runs):
            raise SweepError(f"--index {index}: the sweep has runs 0..{len(sweep.runs) - 1}")
    if args.list:
        for i, run in enumerate(sweep.runs):
            done = (run.directory(sweep.output) / "result.json").is_file()
            print(f"{i}\t{run.name}\t{'finished' if done else 'todo'}")
        return 0
    check_output(sweep)
    if args.collect:
        print(f"wrote {write_results(sweep)}")
        return 0
    jobs = args.jobs or sweep.jobs
    return Runner(sweep, max(1, jobs)).run(args.index if args.index else list(range(len(sweep.runs))))


if __name__ == "__main__":
    sys.exit(main())
