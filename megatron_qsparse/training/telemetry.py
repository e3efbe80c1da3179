"""What a run reports: console lines, metrics.jsonl (one JSON object per step), TensorBoard scalars, plus
the global aggregation of realized sparsity and per-layer gradient norms across all ranks."""

import json
import math
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_qsparse import atomic
from megatron_qsparse.layers.site import SITES, site_transforms
from megatron_qsparse.parallel.host_collectives import all_reduce_host


class _Layers:
    """Global 0-based layer index of a module or parameter name: megatron-core numbers its transformer layers
    globally (``layer_number``, 1-based, counting the pipeline stage's and the model chunk's offset)."""

    def __init__(self, model):
        from megatron.core.transformer.transformer_layer import BaseTransformerLayer

        self.prefixes = [
            (name + ".", module.layer_number - 1)
            for name, module in model.named_modules()
            if isinstance(module, BaseTransformerLayer)
        ]

    def of(self, name: str) -> Optional[int]:
        return next((layer for prefix, layer in self.prefixes if name.startswith(prefix)), None)


def sparsity_by_layer(model, num_layers: int) -> torch.Tensor:
    """[num_layers, 4 sites] realized input sparsity of the last forward, averaged over all ranks holding it
    (TP shards of row-parallel inputs average to the whole row; data-parallel replicas average their data)."""
    sums = torch.zeros(2, num_layers, len(SITES), dtype=torch.float64)
    layers = _Layers(model)
    for name, transform in site_transforms(model):
        layer = layers.of(name)
        if layer is not None and transform.last_sparsity is not None:
            column = SITES.index(transform.site.name)
            sums[0, layer, column] += float(transform.last_sparsity)
            sums[1, layer, column] += 1
    sums = all_reduce_host(sums)
    return sums[0] / sums[1].clamp(min=1)


def site_means(per_layer: torch.Tensor) -> Dict[str, float]:
    return {site: float(per_layer[:, i].mean()) for i, site in enumerate(SITES)}


class GradientCapture:
    """Copies the gradients that backward produces during one step (hooks on every parameter), so per-layer
    norms of the data-parallel-averaged gradient can be computed whatever ZeRO does with ``.grad``.
    Costs one extra copy of the gradients for the captured step: used at the evaluation interval only."""

    def __init__(self, model):
        self.model = model
        self.buffers: Dict[str, torch.Tensor] = {}
        self.handles = [
            p.register_hook(partial(self._add, name)) for name, p in model.named_parameters() if p.requires_grad
        ]

    def _add(self, name: str, grad: torch.Tensor) -> None:
        held = self.buffers.get(name)
        self.buffers[name] = grad.detach().clone() if held is None else held.add_(grad)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def layer_norms(self, num_layers: int) -> torch.Tensor:
        """[num_layers] L2 norms of the averaged gradient of each layer; every rank gets them."""
        from megatron.core import parallel_state as ps

        self.close()
        squares = torch.zeros(num_layers, dtype=torch.float64)
        layers = _Layers(self.model)
        dp_size = ps.get_data_parallel_world_size()
        for name, p in self.model.named_parameters():
            layer = layers.of(name)
            grad = self.buffers.get(name)
            if layer is None or grad is None:
                continue
            expert = not getattr(p, "allreduce", True)
            group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
            dist.all_reduce(grad, group=group)
            grad /= dp_size
            first_replica = (ps.get_expert_data_parallel_rank() if expert else ps.get_data_parallel_rank()) == 0
            tp_unique = getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0
            if first_replica and tp_unique:
                squares[layer] += float(grad.double().pow(2).sum())
        self.buffers.clear()
        return all_reduce_host(squares).sqrt()


class MetricsWriter:
    """metrics.jsonl and TensorBoard, written by global rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int):
        self.enabled = dist.get_rank() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)

    def _truncate_after(self, start_step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old records."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start_step
        ]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}/{i}": v for i, v in enumerate(value)})
        else:
            out[prefix + key] = value
    return out


def console(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def peak_flops() -> Optional[float]:
    """The dense bf16 peak FLOP/s of all ranks' devices together (one GPU per rank); None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return None
    return peak * 1e12 * dist.get_world_size()


def mfu_fields(tokens_per_s: float, model_flops_per_token: float, activated_flops_per_token: float) -> Dict[str, float]:
    """Model FLOPs utilization (achieved FLOP/s over the peak), counted two ways: ``mfu`` with Megatron-LM's FLOP
    count (``model.summary.model_flops_per_token``), ``mfu_activated`` with ours, the block linears at their
    activated size (``activated_flops_per_token``). Empty where there is no peak to divide by (CPU, unknown GPU)."""
    peak = peak_flops()
    if peak is None:
        return {}
    return {
        "mfu": tokens_per_s * model_flops_per_token / peak,
        "mfu_activated": tokens_per_s * activated_flops_per_token / peak,
    }
