"""Hugging Face side: the Q-Sparse configuration and causal LM (model_type "qsparse") and conversions.

Importing this package registers the classes with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(export_dir)`` needs no ``trust_remote_code``; without the package, an
export still loads with ``trust_remote_code=True`` from the code files saved beside its weights.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from megatron_qsparse.hf.configuration_qsparse import QSparseHFConfig
from megatron_qsparse.hf.modeling_qsparse import QSparseForCausalLM

AutoConfig.register("qsparse", QSparseHFConfig, exist_ok=True)
AutoModelForCausalLM.register(QSparseHFConfig, QSparseForCausalLM, exist_ok=True)
