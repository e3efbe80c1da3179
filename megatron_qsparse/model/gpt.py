"""Build megatron-core's GPTModel for this pipeline stage from a ``QSparseConfig``."""

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_qsparse.model.config import QSparseConfig
from megatron_qsparse.model.spec import qsparse_block_spec


def build_gpt_model(cfg: QSparseConfig, transformer_config) -> GPTModel:
    """The stage of the model this rank holds (megatron-core's ``parallel_state`` must be initialized)."""
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=qsparse_block_spec(cfg, transformer_config),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
    )
