"""Where the project's Triton kernels run, and how a caller asks for one.

The kernels (``triton_select.py``: top-K and N:M masks; ``triton_bitnet.py``: BitNet's quantizers;
``triton_decode.py``: the sparse decode GEMV) are GPU routes of the torch definitions in
``megatron_qsparse.sparsity`` and ``megatron_qsparse.inference``, which stay the definitions: every kernel is
tested equal to them. A caller holding a CUDA tensor asks ``triton_op(name, x)`` and gets the kernel, or None
(Triton not installed, ``QSPARSE_TRITON=0``, or a dtype the kernel does not take) and takes its torch route.

On a machine without a GPU the same kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
read by Triton when a kernel module is first imported): that is how the test suite proves them. Callers never
reach the interpreter by accident: CPU tensors go to the compiled C++ ops or torch, unless a test asks for the
Triton routes on CPU with ``on_cpu_for_tests()``.
"""

import contextlib
import functools
import importlib
import os

import torch

# the routes by name, and the module of each
ROUTES = {
    "topk_mask": "triton_select",
    "block_topk_mask": "triton_select",
    "kth_and_greater": "triton_select",
    "threshold_mask": "triton_select",
    "topk_values": "triton_select",
    "abs_sum": "triton_bitnet",
    "ternary": "triton_bitnet",
    "int8_levels": "triton_bitnet",
    "int8_absmax": "triton_bitnet",
    "sparse_gemv": "triton_decode",
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read
_CPU_FOR_TESTS = [False]


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a build that cannot load here
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter runs the kernels (on CPU tensors) instead of compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled() -> bool:
    return os.environ.get("QSPARSE_TRITON", "1") != "0" and triton_installed()


def applies(x: torch.Tensor) -> bool:
    """The Triton routes take ``x``: a CUDA tensor of a dtype they read (or a CPU one under ``on_cpu_for_tests``)."""
    if x.dtype not in DTYPES or not enabled():
        return False
    return x.device.type == "cuda" or (_CPU_FOR_TESTS[0] and x.device.type == "cpu" and interpreting())


def kernel(name: str):
    """The Triton route ``name`` itself (imports its module; for tests and benchmarks)."""
    return getattr(importlib.import_module(f"megatron_qsparse.kernels.{ROUTES[name]}"), name)


def triton_op(name: str, x: torch.Tensor):
    """The Triton route ``name`` for ``x`` where it applies, else None (the caller takes its torch route)."""
    return kernel(name) if applies(x) else None


@contextlib.contextmanager
def on_cpu_for_tests():
    """Send CPU tensors to the Triton routes (under ``TRITON_INTERPRET=1``): how tests prove the dispatch of the
    trainer's and the Hugging Face model's layers without a GPU."""
    if not interpreting():
        raise RuntimeError("on_cpu_for_tests needs TRITON_INTERPRET=1 set before Triton is imported")
    _CPU_FOR_TESTS[0] = True
    try:
        yield
    finally:
        _CPU_FOR_TESTS[0] = False
