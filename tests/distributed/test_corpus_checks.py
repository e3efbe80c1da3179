"""The corpus checks in front of megatron-core's GPTDataset under 2 gloo ranks: global rank 0 alone reads the
corpus, and every rank gets its verdict (the same error, or the same cache directory), so none waits or differs."""

import pytest

from distributed.launch import run_workers

pytestmark = pytest.mark.slow


class Tokenizer:
    vocab_size, eod = 2000, 0


def write_corpus(prefix: str, ids) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def checks_on_every_rank(rank, world_size, prefix: str, cache: str):
    from megatron_qsparse.data import gpt_data
    from megatron_qsparse.errors import DataError

    if rank != 0:  # only rank 0 may read the corpus
        gpt_data.max_token_id = gpt_data.corpus_identity = lambda *a: pytest.fail(f"rank {rank} read the corpus")
    directory = str(gpt_data.corpus_cache_dir(cache, [prefix]))
    try:
        gpt_data.check_corpus_tokenizer([prefix], Tokenizer(), 2048, "data.train")
    except DataError as err:
        return directory, str(err)
    return directory, None


def test_rank_0_reads_the_corpus_and_every_rank_raises_its_error(tmp_path):
    write_corpus(str(tmp_path / "c"), [5, 2001, 0])
    results = run_workers(2, checks_on_every_rank, str(tmp_path / "c"), str(tmp_path / "cache"))
    (directory, error), other = results
    assert other == (directory, error)
    assert directory.startswith(str(tmp_path / "cache" / "corpus-"))
    assert error.startswith("data.train: corpus ") and "token id 2001" in error
