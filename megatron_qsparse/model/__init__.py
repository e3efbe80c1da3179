"""Model description (config, presets) and its megatron-core specs."""

from megatron_qsparse.model.config import PRESETS, QSparseConfig, SparsityConfig, apply_overrides, preset
