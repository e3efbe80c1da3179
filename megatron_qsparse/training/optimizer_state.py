"""The optimizer state in a layout-independent form, so a run resumes under another TP/PP/DP/EP layout, world
size or ZeRO stage.

What is saved: for every trainable parameter its fp32 master weight and Adam's two moments, each as the whole
tensor of this rank's model shard (gathered from the ZeRO partitions of the data-parallel group), written through
megatron-core's ``dist_checkpointing`` with exactly the sharding metadata of the parameter itself (the
``ShardedTensor`` of ``model.sharded_state_dict()``, re-keyed ``optimizer.<state>.<key>``). So the optimizer
state reshards the way the weights do: a TP=2 moment loads at TP=1 as the concatenation of its halves, a PP
stage's moments go to whichever stage holds those layers, expert moments follow their experts, and data-parallel
replicas are written once. Adam's step count (the same for every parameter) rides in the checkpoint's common
state.

Why ``dist_checkpointing`` rather than DeepSpeed's universal checkpoint: the weights are already written that
way and megatron-core's sharding metadata is the one thing that knows how this model's tensors split (fused QKV
by query groups, the gated fc1 as two halves, vocabulary padding, experts); DeepSpeed's conversion needs an
offline step per resume and patterns for each split that would restate that knowledge.

Exactness: the gather sums one rank's fragment with zeros, so every fp32 value is carried unchanged; resuming
under the same layout restores the very bits ZeRO held (the resume tests compare losses bit for bit).

Cost: each of the three states is all-reduced over the data-parallel group once per save (DeepSpeed's
``get_full_hp_param``), and held whole on every rank while the save runs: three fp32 copies of the local shard.
"""

from typing import Dict, Iterator, Tuple

import torch

STATES = ("fp32_param", "exp_avg", "exp_avg_sq")  # DeepSpeed's names; fp32_param is the master weight
PREFIX = "optimizer"
STEP_KEY = "optimizer_step"


def _trainable(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def _sharded_by_parameter(model) -> Dict[int, object]:
    """``id(parameter)`` -> its ShardedTensor (or factory) in the model's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    return {id(entry.data): entry for entry in nested_values(sharded)}


def _with_metadata(model, tensors: Dict[str, Dict[str, torch.Tensor]]) -> dict:
    """``tensors[state][parameter name]`` wrapped as sharded tensors of the parameters' own layout."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    by_parameter = _sharded_by_parameter(model)
    out = {}
    for name, param in _trainable(model):
        entry = by_parameter.get(id(param))
        if entry is None:  # every trained tensor must reshard: a gap here would silently reset it
            raise RuntimeError(f"parameter {name} has no entry in the model's sharded state dict")
        for state in STATES:
            out[f"{PREFIX}.{state}.{name}"] = make_sharded_optimizer_tensor(entry, tensors[state][name], state)
    return out


def _link_fragments(engine) -> None:
    """Make Adam's state exist for every ZeRO partition (zeros at step 0 where it does not yet: a fresh engine
    being resumed) and link every parameter to its fragments of it. DeepSpeed links them once, right after the
    first parameter group's first update, so the groups updated after it (the norms' group) would have none."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    adam = zero.optimizer
    for group, flat in enumerate(zero.single_partition_of_fp32_groups):
        if not adam.state.get(flat):
            adam.state[flat] = {
                "step": torch.tensor(0.0),  # torch keeps Adam's step as a CPU fp32 scalar (not fused/capturable)
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[group], flat, adam.state)


def _adam_step(engine) -> int:
    """Adam's step count (every flat partition holds the same); 0 before the first update."""
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def sharded_optimizer_state(model, engine) -> dict:
    """Collective over the data-parallel groups: this rank's optimizer state as a sharded state dict for
    ``dist_checkpointing.save``."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    def full(param, state):
        if state == "fp32_param":
            value = safe_get_full_fp32_param(param)
        else:
            value = safe_get_full_optimizer_state(param, state)
        if value is None:
            raise RuntimeError(f"DeepSpeed holds no {state} for a parameter of shape {tuple(param.shape)}")
        return value.detach().float().cpu()

    _link_fragments(engine)
    tensors = {state: {name: full(p, state) for name, p in _trainable(model)} for state in STATES}
    sharded = _with_metadata(model, tensors)
    sharded[STEP_KEY] = _adam_step(engine)
    return sharded


def load_optimizer_state(model, engine, load) -> None:
    """Fill the engine's ZeRO partitions from a saved optimizer state, whatever layout wrote it. ``load`` is the
    checkpoint reader (``sharded state dict -> loaded state dict``), the safe one of ``model/safe_load.py``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    empty = {
        state: {name: torch.empty(p.shape, dtype=torch.float32) for name, p in _trainable(model)} for state in STATES
    }
    template = _with_metadata(model, empty)
    template[STEP_KEY] = 0
    loaded = load(template)
    _link_fragments(engine)
    for name, param in _trainable(model):
        for state in STATES:
            value = loaded[f"{PREFIX}.{state}.{name}"].to(param.device)
            if state == "fp32_param":
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, state)
    _set_adam_step(engine, int(loaded[STEP_KEY]))


def _set_adam_step(engine, step: int) -> None:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
