"""What the benchmark tools share: a description of the machine and interleaved median timing."""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Other work on the machine skews wall-clock times; the load says how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def machine_line(m: dict) -> str:
    """The machine of a report, in one line for the tables."""
    return (
        f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['cpu_capability']}), "
        f"{m['torch_threads']} threads, load {m['load_average_1min']} (1 min) at start"
    )


def print_report(report: dict, as_json: bool, print_table: Callable[[dict], None]) -> int:
    """The report as JSON on stdout, or as the tool's table; the tool's exit status (0)."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def interleaved_medians(
    calls: Dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    before_each: Optional[Callable[[], object]] = None,
) -> Dict[str, float]:
    """Median milliseconds of each call. The calls take turns (in a rotating order) so that all of them see
    the same machine state: a busy neighbour or a frequency change shows in every column, not just one.
    ``before_each`` runs untimed before every call (e.g. to evict the caches)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: Dict[str, list] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


class CacheEvictor:
    """Reads a buffer several times the size of the last-level cache, pushing out what the previous call left
    there. A decoder streams gigabytes of weights per token, so no layer finds its weights cached; without this,
    a benchmark repeating one projection would find part of a small weight (or the rows it kept) still in L3."""

    def __init__(self, megabytes: int = 128):
        self.buffer = torch.ones(megabytes * 2**20 // 4)

    def __call__(self) -> None:
        self.buffer.sum()
