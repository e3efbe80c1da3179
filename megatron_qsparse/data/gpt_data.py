"""Training data: megatron-core's GPTDataset over .bin/.idx blends, a prompt/response SFT dataset, and the
deterministic order in which a data-parallel rank reads its microbatches (resumable by step).

Two guards sit in front of megatron-core, which would otherwise fail far from the cause (an IndexError deep in
its dataset): the index cache is keyed by the corpus files themselves (:func:`corpus_cache_dir`), so a corpus
rewritten at the same prefix rebuilds its indices; and :func:`check_corpus_tokenizer` refuses a corpus made
with another tokenizer before training starts."""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_qsparse.data.indexed import read_corpus_meta
from megatron_qsparse.data.tokenizer import tokenizer_fingerprint
from megatron_qsparse.errors import DataError
from megatron_qsparse.parallel.rank0 import on_rank_0

BATCH_KEYS = ("tokens", "labels", "loss_mask")
# Bytes read at a time by the token-id scan: bounded memory whatever the corpus size.
SCAN_CHUNK_BYTES = 32 * 2**20
PREPROCESS_HINT = "rerun tools/preprocess_data.py with data.tokenizer"


def build_gpt_datasets(
    train_blend: Sequence[Tuple[float, str]],
    valid_blend: Sequence[Tuple[float, str]],
    tokenizer,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: Path,
    split: Optional[Sequence[float]] = None,
):
    """(train, valid) GPTDatasets; ``valid`` is None without held-out prefixes. Every rank builds them; the
    index cache (under ``cache_dir``, in a sub-directory named by the corpus files' identity) is written by
    global rank 0 first (megatron-core's builder orders that).

    ``split`` ([train, valid, test] proportions, Megatron-LM's ``--split 969,30,1``; ``valid_blend`` empty) divides
    every corpus of ``train_blend`` by documents, in order, as megatron-core does: train reads the first part, valid
    (None when its share is 0) the next; the test part is held out and not built."""
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

    if split is not None and valid_blend:
        raise ValueError("build_gpt_datasets: give a split of train_blend or a valid_blend, not both")
    prefixes = [p for _, p in [*train_blend, *valid_blend]]
    if split is None:
        blends = dict(blend_per_split=[blend(train_blend), blend(valid_blend), None])
    else:
        total = sum(float(share) for share in split)  # megatron-core reads plain decimals only: no "1e-05"
        blends = dict(blend=blend(train_blend), split=",".join(f"{float(share) / total:.15f}" for share in split))
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **blends,
        path_to_cache=str(corpus_cache_dir(cache_dir, prefixes)),
        tokenizer=DatasetTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens inside attention
    )
    if split is not None:
        config.split_matrix[2] = None  # the test part: held out, never read here, so no index is built for it
    has_valid = bool(valid_blend) or (split is not None and config.split_matrix[1] is not None)
    sizes = [train_samples, valid_samples if has_valid else None, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def corpus_cache_dir(cache_dir: Path, prefixes: Sequence[str]) -> Path:
    """The directory megatron-core caches its sample indices in: ``cache_dir/corpus-<hash>``, the hash of every
    prefix's .bin and .idx (absolute path, size, mtime). megatron-core names its cache files by a hash of the
    dataset config alone, which does not see the corpus content: without this, a corpus rewritten at the same
    prefix would be read through the old corpus's indices. Hashed on rank 0: it writes the cache the others read,
    so they must use its directory even where the corpus is a per-node copy with other modification times."""
    return Path(cache_dir) / f"corpus-{on_rank_0(corpus_identity, prefixes)}"


def corpus_identity(prefixes: Sequence[str]) -> str:
    """A short hash of the corpus files' identity; a missing file raises its OSError (one line, exit 66)."""
    digest = hashlib.sha256()
    for prefix in sorted(set(prefixes)):
        for suffix in (".bin", ".idx"):
            path = os.path.abspath(f"{prefix}{suffix}")
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def check_corpus_tokenizer(prefixes: Sequence[str], tokenizer, vocab_size: int, source_key: str) -> None:
    """Refuse a corpus the model cannot read, with a one-line :class:`DataError` naming the prefix and
    ``source_key`` (``data.train`` / ``data.valid``): one whose ``PREFIX.meta.json`` names another tokenizer
    than ``tokenizer``, or (always checked, sidecar or not) one holding a token id the model's embedding
    (``vocab_size`` rows) or the tokenizer does not have. In a distributed job every rank calls it (it is a
    collective): global rank 0 reads the corpus and every rank raises the same error."""
    on_rank_0(_check_corpus, prefixes, tokenizer, vocab_size, source_key)


def _check_corpus(prefixes: Sequence[str], tokenizer, vocab_size: int, source_key: str) -> None:
    current = None  # the tokenizer's fingerprint hashes its whole vocabulary: once, and only for a sidecar
    for prefix in prefixes:
        meta = read_corpus_meta(str(prefix))  # None: made before sidecars (the id scan still guards it)
        if meta is not None:
            current = current or tokenizer_fingerprint(tokenizer)
            _check_recorded_tokenizer(str(prefix), meta, current, source_key)
        _check_token_ids(str(prefix), tokenizer, vocab_size, source_key)


def _check_recorded_tokenizer(prefix: str, meta: dict, current: dict, source_key: str) -> None:
    recorded = meta.get("tokenizer") or {}
    differs = recorded.get("vocab_size") != current["vocab_size"]
    if recorded.get("vocab_sha256") and current.get("vocab_sha256"):
        differs = differs or recorded["vocab_sha256"] != current["vocab_sha256"]
    if differs:
        raise DataError(
            f"{source_key}: corpus {prefix} was made with tokenizer {_describe(recorded)} but data.tokenizer is "
            f"{_describe(current)}; {PREPROCESS_HINT}, or set data.tokenizer to {recorded.get('path')}"
        )


def _describe(fingerprint: dict) -> str:
    sha = fingerprint.get("vocab_sha256")
    return (
        f"{fingerprint.get('path') or '(unnamed)'} ({fingerprint.get('vocab_size')} tokens"
        + (f", vocab sha256 {sha[:12]}" if sha else "")
        + ")"
    )


def _check_token_ids(prefix: str, tokenizer, vocab_size: int, source_key: str) -> None:
    largest = max_token_id(prefix)
    limit = min(vocab_size, tokenizer.vocab_size)
    if largest is not None and largest >= limit:
        raise DataError(
            f"{source_key}: corpus {prefix} holds token id {largest} but the vocabulary has {limit} ids "
            f"(model.vocab_size {vocab_size}, data.tokenizer {tokenizer.vocab_size} tokens): was it made with "
            f"another tokenizer? {PREPROCESS_HINT}"
        )


def max_token_id(prefix: str) -> Optional[int]:
    """The largest token id in ``PREFIX.bin`` (None when it is empty), read in bounded chunks in the dtype
    the .idx header records."""
    dtype = np.dtype(token_dtype(f"{prefix}.idx"))
    path = f"{prefix}.bin"
    size = os.stat(path).st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (the .idx says {dtype.name}): "
            f"the .bin and .idx do not belong together; rerun tools/preprocess_data.py"
        )
    chunk = bytearray(SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % dtype.itemsize)
    largest = None
    with open(path, "rb") as stream:
        while filled := stream.readinto(chunk):
            value = int(np.frombuffer(chunk, dtype=dtype, count=filled // dtype.itemsize).max())
            largest = value if largest is None else max(largest, value)
    return largest


def token_dtype(idx_path: str) -> type:
    """The token dtype recorded in a megatron-core .idx header (its DType code)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    with open(idx_path, "rb") as stream:
        header = stream.read(len(_INDEX_HEADER) + 9)
    if len(header) < len(_INDEX_HEADER) + 9 or not header.startswith(_INDEX_HEADER):
        raise DataError(f"{idx_path}: not a megatron-core index (bad header); rerun tools/preprocess_data.py")
    (version,) = struct.unpack("<Q", header[len(_INDEX_HEADER) : len(_INDEX_HEADER) + 8])
    code = header[-1]
    if version != 1 or code not in {d.value for d in DType}:
        raise DataError(f"{idx_path}: unsupported index version {version} or dtype code {code}; rerun preprocessing")
    return DType.dtype_from_code(code)


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
    offset: int = 0,
) -> List[Dict[str, torch.Tensor]]:
    """The microbatches data-parallel rank ``dp_rank`` trains on at ``step``: global batch ``step`` is samples
    ``offset + [step·G, (step+1)·G)``, split into contiguous per-rank slices, then into microbatches. A function
    of the step alone, so a resumed run reads exactly what the interrupted one would have (``offset``: a resume
    under another global batch size continues from the samples consumed, see the trainer)."""
    per_rank = global_batch // dp_size
    first = offset + step * global_batch + dp_rank * per_rank
    out = []
    for start in range(first, first + per_rank, micro_batch):
        samples = [dataset[i % len(dataset)] for i in range(start, start + micro_batch)]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS})
    return out
