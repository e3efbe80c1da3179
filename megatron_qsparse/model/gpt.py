"""Build megatron-core's GPTModel for this pipeline stage from a ``QSparseConfig``; under interleaved 1F1B
(virtual pipeline stages) the stage is several model chunks, held by one :class:`ModelChunks`."""

from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_qsparse.model.config import QSparseConfig
from megatron_qsparse.model.spec import qsparse_block_spec


def build_gpt_model(cfg: QSparseConfig, transformer_config):
    """The stage of the model this rank holds (megatron-core's ``parallel_state`` must be initialized): one
    GPTModel, or with ``virtual_pipeline_model_parallel_size`` its chunks as a ``ModelChunks``."""
    vpp = transformer_config.virtual_pipeline_model_parallel_size
    if not vpp:
        return _gpt_chunk(cfg, transformer_config, None)
    return ModelChunks([_gpt_chunk(cfg, transformer_config, stage) for stage in range(vpp)])


def _gpt_chunk(cfg: QSparseConfig, transformer_config, vp_stage) -> GPTModel:
    """Chunk ``vp_stage`` of this rank (None: the whole stage). The embedding lives in the first chunk of the
    first stage, the output layer in the last chunk of the last stage."""
    virtual = vp_stage is not None
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=qsparse_block_spec(cfg, transformer_config),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )


class ModelChunks(torch.nn.ModuleList):
    """This rank's virtual pipeline stages, in order: chunk ``c`` of PP rank ``r`` holds the layers of virtual
    stage ``c · pp + r``. To DeepSpeed, the checkpoints and the telemetry it is one module: parameters are named
    ``<chunk>.<name>``, and its sharded state dict is the union of the chunks' (megatron-core's global keys, so
    a checkpoint is the same whichever layout wrote it). The schedule runs chunk ``c`` as ``forward(..., chunk=c)``."""

    def forward(self, *args, chunk: int, **kwargs):
        return self[chunk](*args, **kwargs)

    @property
    def config(self):
        return self[0].config

    def sharded_state_dict(self) -> dict:
        merged = {}
        for index, chunk in enumerate(self):
            merged.update({f"{index}.{name}": value for name, value in chunk.sharded_state_dict().items()})
        return merged


def model_chunks(model) -> List[torch.nn.Module]:
    """The chunks of this rank's model stage: itself when it is not split."""
    return list(model) if isinstance(model, ModelChunks) else [model]
