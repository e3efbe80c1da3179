"""The guards in front of megatron-core's GPTDataset: its index cache follows the corpus files (a corpus rewritten
at the same prefix rebuilds its indices), and a corpus made with another tokenizer is refused in one line."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qsparse.data import gpt_data
from megatron_qsparse.data.gpt_data import build_gpt_datasets, check_corpus_tokenizer, corpus_cache_dir, max_token_id
from megatron_qsparse.data.tokenizer import tokenizer_fingerprint
from megatron_qsparse.errors import EXIT_DATA, EXIT_NO_INPUT, DataError, exit_code_and_message

EOD = 0
DOC_LENGTH = 30


class FakeTokenizer:
    """What build_gpt_datasets reads from a tokenizer."""

    vocab_size, eod = 2000, EOD


def write_corpus(prefix: Path, documents, dtype=np.uint16) -> None:
    """One megatron-core document per list of ids, written by megatron-core's own builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def documents_of(first_value: int, count: int) -> list:
    """``count`` documents, document d made of the id ``first_value + d`` and a closing end-of-document."""
    return [[first_value + d] * (DOC_LENGTH - 1) + [EOD] for d in range(count)]


def sample_ids(dataset) -> set:
    return {int(t) for i in range(len(dataset)) for t in dataset[i]["tokens"]}


def build(prefix: Path, cache: Path):
    train, _ = build_gpt_datasets([(1.0, str(prefix))], [], FakeTokenizer(), 16, 1, 20, 0, cache)
    return train


# ---- the index cache ------------------------------------------------------------------------------------------
def test_corpus_rewritten_at_the_same_prefix_rebuilds_its_indices(tmp_path):
    prefix, cache = tmp_path / "corpus", tmp_path / "run" / "data_cache"
    write_corpus(prefix, documents_of(100, 40))
    first = build(prefix, cache)
    assert sample_ids(first) <= set(range(100, 140)) | {EOD}

    # Fewer, shorter-lived documents with other ids: the old indices point past its end (IndexError before).
    write_corpus(prefix, documents_of(500, 6))
    second = build(prefix, cache)
    assert sample_ids(second) == set(range(500, 506)) | {EOD}  # every new document is read, nothing old
    assert len(list(cache.glob("corpus-*"))) == 2  # the old entry is left alone, never read again


def test_unchanged_corpus_reuses_its_cache_directory(tmp_path):
    prefix = tmp_path / "corpus"
    write_corpus(prefix, documents_of(100, 4))
    first = corpus_cache_dir(tmp_path / "cache", [str(prefix)])
    assert corpus_cache_dir(tmp_path / "cache", [str(prefix)]) == first
    assert first.parent == tmp_path / "cache" and first.name.startswith("corpus-")
    stat = os.stat(f"{prefix}.bin")
    os.utime(f"{prefix}.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size, rewritten
    assert corpus_cache_dir(tmp_path / "cache", [str(prefix)]) != first


def test_missing_corpus_file_names_it_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        corpus_cache_dir(tmp_path / "cache", [str(tmp_path / "nowhere")])
    code, line = exit_code_and_message(caught.value)
    assert code == EXIT_NO_INPUT
    assert line == f"{tmp_path / 'nowhere.bin'}: no such file or directory"


# ---- the corpus and the tokenizer -----------------------------------------------------------------------------
def assert_data_error(caught, *fragments) -> str:
    code, line = exit_code_and_message(caught.value)
    assert code == EXIT_DATA and "\n" not in line
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_token_ids_within_the_vocabulary_pass(tmp_path, tokenizer):
    write_corpus(tmp_path / "ok", [[1, 1999, EOD], [5, EOD]])
    check_corpus_tokenizer([str(tmp_path / "ok")], tokenizer, 2048, "data.train")
    assert max_token_id(str(tmp_path / "ok")) == 1999


def test_token_id_past_the_vocabulary_is_refused(tmp_path, tokenizer):
    write_corpus(tmp_path / "ok", [[1, 2, EOD]])
    write_corpus(tmp_path / "other", [[1, 2, EOD], [3, 2000, EOD]])  # 2000: one past the 2000-token tokenizer
    with pytest.raises(DataError) as caught:
        check_corpus_tokenizer([str(tmp_path / "ok"), str(tmp_path / "other")], tokenizer, 2048, "data.valid")
    assert_data_error(
        caught, "data.valid", f"corpus {tmp_path / 'other'} ", "token id 2000", "2000 ids", "another tokenizer"
    )


def test_model_vocabulary_smaller_than_the_ids_is_refused(tmp_path, tokenizer):
    write_corpus(tmp_path / "c", [[1500, EOD]])
    with pytest.raises(DataError) as caught:
        check_corpus_tokenizer([str(tmp_path / "c")], tokenizer, 1024, "data.train")
    assert_data_error(caught, "token id 1500", "1024 ids", "model.vocab_size 1024")


def test_dtype_comes_from_the_index_header(tmp_path, tokenizer):
    # 70000 read as uint16 would be 4464, still past the vocabulary but not the id in the file.
    write_corpus(tmp_path / "wide", [[3, 70000, EOD]], dtype=np.int32)
    assert max_token_id(str(tmp_path / "wide")) == 70000
    with pytest.raises(DataError) as caught:
        check_corpus_tokenizer([str(tmp_path / "wide")], tokenizer, 2048, "data.train")
    assert_data_error(caught, "token id 70000")


def test_scan_reads_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt_data, "SCAN_CHUNK_BYTES", 64)  # 32 uint16 ids a chunk
    ids = [7] * 1000 + [1234] + [7] * 30
    write_corpus(tmp_path / "c", [ids])
    assert max_token_id(str(tmp_path / "c")) == 1234
    write_corpus(tmp_path / "empty", [])
    assert max_token_id(str(tmp_path / "empty")) is None


def write_sidecar(prefix: Path, vocab_size: int, sha: str, path: str) -> None:
    tokenizer = {"path": path, "vocab_size": vocab_size, "vocab_sha256": sha, "eod": EOD}
    meta = {"format": 1, "tokenizer": tokenizer, "documents": 1, "tokens": 3, "bin_size": 6, "idx_size": 0}
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))


def test_sidecar_naming_another_tokenizer_is_refused(tmp_path, tokenizer, tokenizer_dir):
    write_corpus(tmp_path / "c", [[1, 2, EOD]])  # ids that any tokenizer has: only the sidecar tells
    write_sidecar(tmp_path / "c", 50257, "ab" * 32, "/models/gpt2")
    with pytest.raises(DataError) as caught:
        check_corpus_tokenizer([str(tmp_path / "c")], tokenizer, 2048, "data.train")
    assert_data_error(caught, "data.train", str(tmp_path / "c"), "/models/gpt2 (50257 tokens", str(tokenizer_dir))


def test_sidecar_with_another_vocabulary_of_the_same_size_is_refused(tmp_path, tokenizer):
    current = tokenizer_fingerprint(tokenizer)["vocab_sha256"]
    write_corpus(tmp_path / "c", [[1, 2, EOD]])
    write_sidecar(tmp_path / "c", tokenizer.vocab_size, "ab" * 32, "/tok/old")
    with pytest.raises(DataError) as caught:
        check_corpus_tokenizer([str(tmp_path / "c")], tokenizer, 2048, "data.valid")
    assert_data_error(caught, "data.valid", "/tok/old", "sha256 abababababab", f"sha256 {current[:12]}")


def test_sidecar_of_the_same_tokenizer_passes(tmp_path, tokenizer):
    write_corpus(tmp_path / "c", [[1, 2, EOD]])
    sha = tokenizer_fingerprint(tokenizer)["vocab_sha256"]
    write_sidecar(tmp_path / "c", tokenizer.vocab_size, sha, "/tok/elsewhere")  # moved: same vocabulary
    check_corpus_tokenizer([str(tmp_path / "c")], tokenizer, 2048, "data.train")
