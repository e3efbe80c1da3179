"""Training data: megatron-core's GPTDataset over .bin/.idx blends, a prompt/response SFT dataset, and the
deterministic order in which a data-parallel rank reads its microbatches (resumable by step)."""

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask")


def build_gpt_datasets(
    train_blend: Sequence[Tuple[float, str]],
    valid_blend: Sequence[Tuple[float, str]],
    tokenizer,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: Path,
):
    """(train, valid) GPTDatasets; ``valid`` is None without held-out prefixes. Every rank builds them; the
    index cache is written by global rank 0 first (megatron-core's builder orders that)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    def blend(pairs):
        if not pairs:
            return None
        return [p for _, p in pairs], ([w for w, _ in pairs] if len(pairs) > 1 else None)

    class DatasetTokenizer:
        """What megatron-core's datasets read from a tokenizer. GPT samples are full windows of the token
        stream, so there is no padding: pad is megatron-core's "none" id (-1), not the end-of-document id
        that our tokenizers reuse as pad (which would mask the loss on every end of document)."""

        vocab_size, eod, pad = tokenizer.vocab_size, tokenizer.eod, -1
        unique_identifiers = {
            "class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        }

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[blend(train_blend), blend(valid_blend), None],
        path_to_cache=str(cache_dir),
        tokenizer=DatasetTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens inside attention
    )
    sizes = [train_samples, valid_samples if valid_blend else None, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


class SFTDataset(torch.utils.data.Dataset):
    """Prompt/response JSON lines; the loss covers the response (and its end-of-document token) only.
    Each example is truncated or padded to ``seq_length``; padding is masked out of the loss."""

    def __init__(
        self, path: Path, tokenizer, seq_length: int, prompt_key: str = "prompt", response_key: str = "response"
    ):
        self.seq_length = seq_length
        self.pad = tokenizer.eod
        self.examples: List[Tuple[List[int], List[int]]] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    prompt, response = record[prompt_key], record[response_key]
                    if not isinstance(prompt, str) or not isinstance(response, str):
                        raise TypeError("fields must be strings")
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{line_no}: expected a JSON object with string fields "
                        f"{prompt_key!r} and {response_key!r} ({err})"
                    ) from None
                self.examples.append((tokenizer.tokenize(prompt), tokenizer.tokenize(response) + [tokenizer.eod]))
        if not self.examples:
            raise ValueError(f"{path}: no examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        prompt, response = self.examples[index % len(self.examples)]
        ids = (prompt + response)[: self.seq_length + 1]
        trained = ([0] * len(prompt) + [1] * len(response))[: self.seq_length + 1]
        pad = self.seq_length + 1 - len(ids)
        ids, trained = ids + [self.pad] * pad, trained + [0] * pad
        return {
            "tokens": torch.tensor(ids[:-1]),
            "labels": torch.tensor(ids[1:]),
            "loss_mask": torch.tensor(trained[1:], dtype=torch.float),
        }


def microbatches(
    dataset,
    step: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
) -> List[Dict[str, torch.Tensor]]:
    """The microbatches data-parallel rank ``dp_rank`` trains on at ``step``: global batch ``step`` is samples
    ``[step·G, (step+1)·G)``, split into contiguous per-rank slices, then into microbatches. A function of the
    step alone, so a resumed run reads exactly what the interrupted one would have."""
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    out = []
    for start in range(first, first + per_rank, micro_batch):
        samples = [dataset[i % len(dataset)] for i in range(start, start + micro_batch)]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS})
    return out
