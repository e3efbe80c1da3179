from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="megatron_qsparse",
    version="0.1.0",
    description="Q-Sparse (top-K activation sparsity), Block Q-Sparse, BitNet b1.58 and MoE on megatron-core",
    packages=find_packages(include=["megatron_qsparse", "megatron_qsparse.*"]),
    package_data={"megatron_qsparse.kernels": ["*.cpp", "*.h"]},  # compiled on first use (megatron_qsparse/kernels)
    python_requires=">=3.10",
    install_requires=["torch==2.13.0"] + requirements,
    entry_points={
        "console_scripts": [
            "qsparse-model-summary=megatron_qsparse.model.summary:main",
            "qsparse-pretrain=megatron_qsparse.training.cli:main",
        ]
    },
)
