"""Run a function in N fresh processes joined by a gloo process group on 127.0.0.1, and collect results.

A failing rank fails the launch with its traceback; a hang is killed at the deadline instead of blocking CI.
"""

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from megatron_qsparse.parallel.ports import free_port


def _worker(rank, world_size, port, outdir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        TORCHDYNAMO_DISABLE="1",
    )
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # megatron-core's notices about missing apex / TransformerEngine

    torch.set_num_threads(1)
    try:
        from megatron_qsparse.parallel import cpu_compat

        cpu_compat.apply()
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=180))
        result = fn(rank, world_size, *args)
        with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def run_workers(world_size: int, fn, *args, timeout: float = 600.0):
    """``fn(rank, world_size, *args)`` on every rank; returns the list of per-rank results."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, outdir, fn, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait on it forever
            time.sleep(0.2)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        errors = []
        for r in range(world_size):
            path = os.path.join(outdir, f"{r}.err")
            if os.path.exists(path):
                errors.append(f"--- rank {r} ---\n" + open(path).read())
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s (killed)")
        results = []
        for r in range(world_size):
            with open(os.path.join(outdir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
