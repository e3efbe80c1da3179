"""Let megatron-core run on a CPU-only torch with the gloo backend.

megatron-core assumes CUDA: it allocates buffers on ``torch.cuda.current_device()``, writes ``device="cuda"``
in factory calls, keeps CUDA RNG states for weight init and dropout, and uses CUDA streams in the MoE all-to-all
dispatcher. ``apply()`` installs one named patch per assumption, once per process. It does nothing when CUDA is
available, so the same code runs unchanged on GPU clusters. ``PATCHES`` lists what was applied (tested).
"""

import contextlib
import logging
from typing import List

import torch
from torch.overrides import TorchFunctionMode

PATCHES: List[str] = []
GPU_STACK_NOTICES = ".*(Apex|apex|Transformer Engine|TransformerEngine|cuda_graph_scope).*"


def silence_gpu_stack_notices() -> None:
    """megatron-core warns at import that TransformerEngine / apex are absent (and about a CUDA-graph option we do
    not use): expected without a GPU stack, so entry points that import it hide exactly these."""
    import warnings

    warnings.filterwarnings("ignore", message=GPU_STACK_NOTICES)


_MODE = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument to the CPU: factory ``device=`` keywords, ``Tensor.cuda()``,
    ``Tensor.to("cuda")``. Cheap: a dict lookup per call, no work for calls without a device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _SyncStream:
    """Stand-in for a CUDA stream or event: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _SyncStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_CURRENT_STREAM = _SyncStream()


def _patch(owner, name: str, value, label: str) -> None:
    setattr(owner, name, value)
    PATCHES.append(label)


def _cuda_runtime_patches() -> None:
    # Each patch is its own function object: torch dynamo rejects one object registered under two names.
    def current_device():
        # A device, not an ordinal: also used in backward passes, which run outside the function mode.
        return torch.device("cpu")

    def set_device(device):
        pass

    def synchronize(device=None):
        pass

    def empty_cache():
        pass

    def manual_seed(seed):
        torch.manual_seed(seed)

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(state, device="cuda"):
        torch.set_rng_state(state)

    def current_stream(device=None):
        return _CURRENT_STREAM

    def stream(s):
        return contextlib.nullcontext()

    _patch(torch.cuda, "current_device", current_device, "torch.cuda.current_device -> cpu device")
    _patch(torch.cuda, "set_device", set_device, "torch.cuda.set_device -> no-op")
    _patch(torch.cuda, "synchronize", synchronize, "torch.cuda.synchronize -> no-op")
    _patch(torch.cuda, "empty_cache", empty_cache, "torch.cuda.empty_cache -> no-op")
    _patch(torch.cuda, "manual_seed", manual_seed, "torch.cuda.manual_seed -> torch.manual_seed")
    _patch(torch.cuda, "get_rng_state", get_rng_state, "torch.cuda.get_rng_state -> cpu state")
    _patch(torch.cuda, "set_rng_state", set_rng_state, "torch.cuda.set_rng_state -> cpu state")
    _patch(torch.cuda, "Stream", _SyncStream, "torch.cuda.Stream -> synchronous stand-in")
    _patch(torch.cuda, "Event", _SyncStream, "torch.cuda.Event -> synchronous stand-in")
    _patch(torch.cuda, "current_stream", current_stream, "torch.cuda.current_stream -> stand-in")
    _patch(torch.cuda, "stream", stream, "torch.cuda.stream -> null context")


def _megatron_patches() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # The RNG tracker (weight init and dropout under tensor parallelism) then forks CPU generator states.
    _patch(mcore_random, "_get_cuda_rng_state", get_cpu_rng_state, "mcore RNG tracker -> cpu generator (get)")
    _patch(mcore_random, "_set_cuda_rng_state", set_cpu_rng_state, "mcore RNG tracker -> cpu generator (set)")
    # Forking swaps the CPU state on purpose here; megatron warns about exactly that on every fork.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    # megatron-core 0.16 references te_general_gemm in the router even without TransformerEngine.
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None, "moe_utils.te_general_gemm -> None (no TE)")

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # gloo's all_to_all_single wants split sizes as a sequence, not as a tensor.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    for module in (moe_utils, token_dispatcher):
        _patch(
            module,
            "maybe_move_tensor_to_cpu",
            maybe_move_tensor_to_cpu,
            f"{module.__name__}.maybe_move_tensor_to_cpu -> numpy split sizes",
        )


def apply() -> bool:
    """Install the CPU patches once; returns True when they are active (False on a CUDA machine)."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is None:
        _cuda_runtime_patches()
        _megatron_patches()
        _MODE = CudaToCpuMode()
        _MODE.__enter__()  # stays active for the life of the process
        PATCHES.append("TorchFunctionMode: device='cuda' / Tensor.cuda() / .to('cuda') -> cpu")
    return True


def is_active() -> bool:
    return _MODE is not None
