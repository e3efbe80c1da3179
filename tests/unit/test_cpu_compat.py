"""The CPU compatibility layer, applied in a fresh interpreter (it patches process-wide state)."""

import json
import subprocess
import sys

SCRIPT = r"""
import json, torch
from megatron_qsparse.parallel import cpu_compat
assert not cpu_compat.is_active()
assert cpu_compat.apply() and cpu_compat.apply()  # idempotent
from megatron.core.tensor_parallel import random as r
from megatron.core.transformer.moe import moe_utils, token_dispatcher
out = {"patches": cpu_compat.PATCHES}
out["factory"] = str(torch.empty(2, device="cuda").device)
out["cuda_method"] = str(torch.ones(2).cuda().device)
out["to_cuda"] = str(torch.ones(2).to("cuda").device)
out["current_device"] = str(torch.zeros(1, device=torch.cuda.current_device()).device)
torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.set_device(0)
r.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
tracker = r.get_cuda_rng_tracker()
before = torch.get_rng_state()
with tracker.fork():
    a = torch.rand(3)
with tracker.fork():
    b = torch.rand(3)
out["fork_restores_default"] = bool(torch.equal(before, torch.get_rng_state()))
out["fork_advances_own_state"] = not torch.equal(a, b)
r.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
with r.get_cuda_rng_tracker().fork():
    out["fork_reproducible"] = bool(torch.equal(torch.rand(3), a))
out["te_gemm_none"] = moe_utils.te_general_gemm is None
out["splits_numpy"] = type(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)).__name__
with torch.cuda.stream(torch.cuda.Stream()):
    torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())
print(json.dumps(out))
"""


def test_patches_are_named_and_work():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env={"TORCHDYNAMO_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["factory"] == out["cuda_method"] == out["to_cuda"] == out["current_device"] == "cpu"
    assert out["fork_restores_default"] and out["fork_advances_own_state"] and out["fork_reproducible"]
    assert out["te_gemm_none"] and out["splits_numpy"] == "ndarray"
    names = "\n".join(out["patches"])
    for expected in (
        "torch.cuda.current_device",
        "mcore RNG tracker",
        "TorchFunctionMode",
        "te_general_gemm",
        "maybe_move_tensor_to_cpu",
        "torch.cuda.Stream",
    ):
        assert expected in names
