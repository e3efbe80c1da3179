"""megatron_qsparse: Q-Sparse (top-K activation sparsity), Block Q-Sparse, BitNet b1.58 and MoE on megatron-core."""

__version__ = "0.1.0"
