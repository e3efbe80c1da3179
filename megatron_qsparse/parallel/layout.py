"""The parallel layout: one self-validating object for the sizes of tensor, pipeline (and virtual pipeline) and
expert parallelism and sequence parallelism, and the data-parallel size they leave for a given world size.

It is the ``parallel`` section of the training configuration, the argument of ``initialize_model_parallel`` and
what a checkpoint records. Checks that need the model (heads, layers, experts against the sizes) are the
model's: ``QSparseConfig.validate_layout``.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor model parallel
    pp: int = 1  # pipeline model parallel
    ep: int = 1  # expert model parallel (carved out of data parallel)
    sp: bool = False  # sequence parallel (needs tp > 1)
    vpp: int = 1  # virtual pipeline stages (model chunks) per PP rank: interleaved 1F1B when > 1

    def __post_init__(self):
        for key in ("tp", "pp", "ep", "vpp"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{key}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.sp, bool):
            raise ValueError(f"parallel.sp: must be true or false, got {self.sp!r}")
        if self.sp and self.tp == 1:
            raise ValueError("parallel.sp: sequence_parallel needs tensor_model_parallel_size > 1 (parallel.tp)")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError("parallel.vpp: virtual pipeline stages need pipeline parallelism (parallel.pp > 1)")

    @property
    def virtual_pipeline_size(self):
        """megatron-core's ``virtual_pipeline_model_parallel_size``: None without interleaving."""
        return self.vpp if self.vpp > 1 else None

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def data_parallel_size(self, world_size: int) -> int:
        """World size / (TP × PP), refused when it does not divide or EP does not divide the result."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"parallel: world size {world_size} is not divisible by tp×pp = {self.tp}×{self.pp}; "
                f"launch a multiple of {self.model_parallel_size} processes or change the layout"
            )
        dp = world_size // self.model_parallel_size
        if dp % self.ep:
            raise ValueError(f"parallel.ep: must divide the data-parallel size {dp}")
        return dp

    def __str__(self) -> str:
        parts = [f"tp{self.tp}"] + ([f"pp{self.pp}"] if self.pp > 1 else [])
        parts += ([f"vpp{self.vpp}"] if self.vpp > 1 else []) + ([f"ep{self.ep}"] if self.ep > 1 else [])
        return "".join(parts) + ("+sp" if self.sp else "")
