"""Activation functions of the gated FFN: ReLU² (from-scratch Q-Sparse models) and SiLU (imported SwiGLU)."""

import torch
import torch.nn.functional as F


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x)²: with a GLU, ``FFN(X) = ReLU(X W_gate)² ⊙ (X W_up)`` (natural zeros at the mlp-mid site)."""
    return torch.square(F.relu(x))


ACTIVATIONS = {"relu2": squared_relu, "silu": F.silu}


def activation_by_name(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
