from pathlib import Path

from setuptools import find_packages, setup


def pinned(name: str) -> list:
    """The requirement lines of a requirements file beside this one (the pins live there, once)."""
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron_qsparse",
    version="0.1.0",
    description="Q-Sparse (top-K activation sparsity), Block Q-Sparse, BitNet b1.58 and MoE on megatron-core",
    # Every directory under megatron_qsparse/ has an __init__.py: one without is left out of the wheel (and an
    # editable install would quietly fill the gap from the checkout). tests/unit/test_packaging.py checks both.
    packages=find_packages(include=["megatron_qsparse", "megatron_qsparse.*"]),
    # The only files read at run time besides modules: the C++ sources, compiled on first use (kernels/__init__.py).
    # The HF export's remote code is the hf/*.py modules themselves. The YAML configs are not shipped: they name
    # repository-relative data (data/tokenizer, ...), so an installed `qsparse-pretrain` takes --config PATH, and
    # without it reports in one line (exit 2) that pretrain_scripts/configs/tiny-cpu.yaml does not exist.
    package_data={"megatron_qsparse.kernels": ["*.cpp", "*.h"]},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0"] + pinned("requirements.txt"),
    extras_require={"eval": pinned("requirements-eval.txt")},  # lm-evaluation-harness (docs/huggingface.md)
    entry_points={
        "console_scripts": [
            "qsparse-model-summary=megatron_qsparse.model.summary:main",
            "qsparse-pretrain=megatron_qsparse.training.cli:main",
        ]
    },
)
