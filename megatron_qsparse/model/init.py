"""Layout-independent weights: every tensor is a slice of a full tensor drawn from a generator seeded by
(seed, the tensor's global key), so TP/PP/EP layouts of the same seed hold the same global model.

The global keys and offsets come from megatron-core's ``sharded_state_dict()`` (the same mapping its
distributed checkpoints use), so this also works for the gated fc1 (two TP-sharded halves) and for experts.
"""

import math
import zlib
from typing import Callable, Tuple

import torch


def sharded_tensors(model) -> list:
    """Every ShardedTensor of the model (factories expanded); their ``.data`` are views of the parameters."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    found = []

    def visit(item):
        if isinstance(item, ShardedTensorFactory):
            for built in nested_values(item.build()):
                visit(built)
        elif isinstance(item, ShardedTensor):
            found.append(item)

    for value in nested_values(model.sharded_state_dict()):
        visit(value)
    return found


def global_slice(st) -> Tuple[slice, ...]:
    """Index of this shard inside the full tensor (prepended axes, e.g. the layer axis, included)."""
    shape = (1,) * st.prepend_axis_num + tuple(st.data.shape)
    return tuple(slice(o, o + n) for o, n in zip(st.global_offset, shape))


def key_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


def default_init(std: float, num_layers: int) -> Callable[[str, tuple, torch.Generator], torch.Tensor]:
    """GPT init: N(0, std) weights, output projections (proj, fc2) scaled by 1/sqrt(2·layers), norms at 1,
    biases at 0."""
    scaled = std / math.sqrt(2.0 * num_layers)

    def init(key: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        if "layernorm" in key:
            return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        if key.endswith("bias"):
            return torch.zeros(shape)
        if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            return torch.randn(shape, generator=generator) * scaled
        return torch.randn(shape, generator=generator) * std

    return init


@torch.no_grad()
def initialize_weights(model, seed: int, init: Callable) -> None:
    """Fill every parameter shard from ``init(key, global_shape, generator)`` sliced at its global offset."""
    for st in sharded_tensors(model):
        full = init(st.key, tuple(st.global_shape), key_generator(seed, st.key))
        st.data.copy_(full[global_slice(st)].reshape(st.data.shape))
