"""The project's compiled CPU ops: Q-Sparse's top-K selection and the sparse decode product.

``qsparse_cpu.cpp`` beside this file defines ``torch.ops.qsparse.topk_mask`` (the selection the training forward
uses on CPU, via ``megatron_qsparse.sparsity.topk``) and ``torch.ops.qsparse.topk_linear`` (selection, gather and
product of one decode projection, via ``megatron_qsparse.inference``). Its selection is a second implementation
of the project's top-K rule, tested equal to the torch one (ties, NaN, inf, blocks).

Built on first use (~40 s; AVX2+FMA, and AVX-512 for the bf16 rows, where torch itself runs such code here;
plain C++ otherwise) into
``~/.cache/megatron_qsparse`` (or ``$QSPARSE_KERNEL_DIR``), keyed on the source, flags and torch version, and
reused after. Without a compiler or ninja, or with ``QSPARSE_KERNELS=0``, ``load()`` returns None and callers
take their torch route: the same results, slower.
"""

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from megatron_qsparse import atomic

HERE = Path(__file__).parent
SOURCES = ("qsparse_cpu.cpp", "engine.cpp")  # compiled into one library
HEADERS = ("rows.h", "select.h", "ternary.h")  # included by the sources
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what the compiled ops read and write, by name
_LOAD_ERROR: List[str] = []  # why load() returned None, for require()


def _compile_flags() -> List[str]:
    flags = ["-O3"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma"]
    if capability.startswith("AVX512"):  # torch's AVX512 level implies F, BW, VL and DQ
        flags += ["-mavx512f", "-mavx512bw"]
    if torch.backends.openmp.is_available():  # at::parallel_for expands to an OpenMP region in our code
        flags.append("-fopenmp")
    return flags


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite the build's copy of the source only when it differs: the build cache is keyed on mtimes."""
    if path.exists() and path.read_text() == text:
        return
    atomic.write_text(path, text)


@functools.lru_cache(maxsize=None)
def load() -> Optional[object]:
    """``torch.ops.qsparse`` once built and loaded; None where it cannot be built (or is switched off)."""
    if os.environ.get("QSPARSE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        texts = {name: (HERE / name).read_text() for name in SOURCES + HEADERS}
        flags = _compile_flags()
        digest = hashlib.sha1("\n".join([*texts.values(), *flags, torch.__version__]).encode()).hexdigest()[:12]
        name = f"qsparse_cpu_{digest}"
        root = Path(os.environ.get("QSPARSE_KERNEL_DIR", Path.home() / ".cache" / "megatron_qsparse"))
        build_dir = root / name
        build_dir.mkdir(parents=True, exist_ok=True)
        for file, text in texts.items():
            _write_if_changed(build_dir / file, text)
        if not (build_dir / f"{name}.so").exists():
            print(f"megatron_qsparse: building the CPU kernels into {build_dir} (once, ~40 s)", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=[str(build_dir / file) for file in SOURCES],
            build_directory=str(build_dir),
            extra_cflags=flags,
            extra_ldflags=[f for f in flags if f == "-fopenmp"],
            is_python_module=False,
        )
        return torch.ops.qsparse
    except Exception as error:  # no compiler, no ninja, read-only home...: stay correct, just slower
        _LOAD_ERROR.append(f"{type(error).__name__}: {error}")
        warnings.warn(
            f"megatron_qsparse CPU kernels unavailable ({type(error).__name__}: {error}); using the "
            "torch routes (same results, slower)",
            stacklevel=2,
        )
        return None


def require(what: str):
    """``torch.ops.qsparse`` for a caller that has no torch route (the decode engine): raises RuntimeError
    saying why the ops could not be built and how to fix it."""
    ops = load()
    if ops is None:
        reason = _LOAD_ERROR[-1] if _LOAD_ERROR else "QSPARSE_KERNELS=0 is set"
        raise RuntimeError(
            f"{what} needs the project's compiled CPU kernels, which are unavailable ({reason}). Fix: install a "
            "C++ compiler (g++) and ninja (`pip install ninja==1.13.2`), unset QSPARSE_KERNELS=0, and make "
            "~/.cache/megatron_qsparse (or $QSPARSE_KERNEL_DIR) writable"
        )
    return ops


def backend() -> str:
    """``"cpp"`` when the compiled ops run, ``"torch"`` for the fallbacks."""
    return "cpp" if load() is not None else "torch"


def compiled_op(name: str, x: torch.Tensor):
    """``torch.ops.qsparse.<name>`` for a CPU fp32/bf16 tensor ``x`` where the ops are built, else None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES.values():
        return None
    ops = load()
    return None if ops is None else getattr(ops, name)
