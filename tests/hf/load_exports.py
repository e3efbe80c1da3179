"""Run in a fresh interpreter, from another directory, with the project's packages made unimportable and the hub
offline: load each export as a user without megatron_qsparse would, and record what the tests compare.

    python load_exports.py TOKENS.pt OUT.pt EXPORT_DIR...
"""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
for blocked in ("megatron_qsparse", "megatron"):
    sys.modules[blocked] = None  # any import of them now raises ImportError

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def main(tokens_path, out_path, *exports):
    tokens = torch.load(tokens_path, weights_only=True)
    results = {}
    for path in exports:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(tokens).logits
            prompt = tokens[:1, :6]
            cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
            uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
            dense_config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            dense_config.sparsity = {site: 0.0 for site in dense_config.sparsity}
            dense = AutoModelForCausalLM.from_pretrained(path, config=dense_config, trust_remote_code=True).eval()
            dense_logits = dense(tokens).logits
        try:
            AutoModelForCausalLM.from_pretrained(path)  # no remote code, no package: must refuse
            refused = False
        except Exception:
            refused = True
        try:  # the sparse kernel is the package's: must refuse, saying how to get it
            AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, use_sparse_kernel=True)
            kernel_refusal = None
        except ImportError as error:
            kernel_refusal = str(error)
        results[path] = {
            "logits": logits,
            "cached": cached,
            "uncached": uncached,
            "dense_logits": dense_logits,
            "refused_without_remote_code": refused,
            "sparse_kernel_refusal": kernel_refusal,
            "class": type(model).__name__,
            "model_type": model.config.model_type,
        }
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
