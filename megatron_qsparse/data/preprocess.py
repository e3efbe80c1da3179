"""Corpus preprocessing: text, JSON lines, parquet or a saved `datasets` directory -> megatron-core .bin/.idx.

Every document becomes one sequence `tokenize(text) + [eod]` of an `IndexedDataset` (one sequence per document),
read back by megatron-core with `IndexedDataset(prefix)`. Files are read in order (`readers`), tokenized by a pool
of worker processes in ordered batches (`tokenizing`), and written through `IndexedDatasetBuilder` to a temporary
prefix that is renamed into place only when complete (`indexed`), with the sidecar `PREFIX.meta.json` that
records the tokenizer (`indexed.read_corpus_meta`).

A long document is read and tokenized in pieces of at most a mebibyte of text (`readers.DOCUMENT_PIECE_CHARACTERS`,
cut where the tokenization does not change) and its ids written as they come: memory does not grow with a
document's size, and the document is still one sequence.

The output is claimed (its directory made, its temporary .bin created) before any input is read: a location that
cannot be written fails at once, as an `OSError` naming it. Bad input stops the run with the file, the line
(or row) and the fix; with `skip_bad` such records are skipped and counted by reason instead (the reasons are
listed in `readers`). Any error or interruption (KeyboardInterrupt, or `errors.Terminated` from the SIGTERM
handler of `errors.run_tool`) removes the temporary files.

`preprocess_json_keys` is Megatron-LM's `--json-keys` naming: one corpus per field, written at
`PREFIX_<key>_document` (`megatron_prefix`), so that `--output-prefix my-corpus --json-keys text` gives
`my-corpus_text_document.bin/.idx` as Megatron-LM's tools/preprocess_data.py does. The inputs are read once per key.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_qsparse.data.indexed import (
    META_SUFFIX,
    IndexedWriter,
    corpus_meta,
    indexed_dataset,
    temporary_prefix,
    with_suffix,
    write_corpus_meta,
)
from megatron_qsparse.data.readers import (
    INPUT_FORMATS,
    TEXT_UNITS,
    BadInputError,
    BadRecord,
    InputFile,
    PreprocessError,
    check_text_unit,
    iter_document_texts,
    offline_hugging_face,
    resolve_inputs,
)
from megatron_qsparse.data.tokenizer import failures_named, load_tokenizer, tokenizer_fingerprint
from megatron_qsparse.data.tokenizing import EncodedBatch, batches, in_order, worker_pool

# The input side is re-exported: callers import its errors and choices from here, with `preprocess`.
__all__ = [
    "INPUT_FORMATS",
    "TEXT_UNITS",
    "BadInputError",
    "BadRecord",
    "InputFile",
    "PreprocessError",
    "PreprocessStats",
    "iter_document_texts",
    "megatron_prefix",
    "preprocess",
    "preprocess_json_keys",
    "resolve_inputs",
]

# SIGTERM's exit status for these tools, which keep nothing partial: 128 + 15, as a shell reports a process killed
# by it (training's 75 means "a checkpoint was written, resume").


@dataclass
class PreprocessStats:
    documents: int
    tokens: int  # written, one eod per document included
    skipped: dict[str, int]  # skipped records by reason
    seconds: float
    bin_path: Path
    idx_path: Path
    meta_path: Path

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        elapsed = max(self.seconds, 1e-9)
        return (
            f"wrote {self.documents} documents, {self.tokens} tokens (skipped: {skipped}) in {self.seconds:.2f} s "
            f"({self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s) "
            f"-> {self.bin_path}, {self.idx_path}, {self.meta_path}"
        )


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def preprocess(
    inputs: list[Path],
    output_prefix: Path,
    tokenizer_path: Path,
    input_format: str = "auto",
    json_key: str = "text",
    text_unit: str = "file",
    workers: int = 1,
    skip_bad: bool = False,
    log: Callable[[str], None] = _log_to_stderr,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize `inputs` into `output_prefix`.bin/.idx (megatron-core `IndexedDataset`), one sequence per document,
    and its sidecar `output_prefix`.meta.json.

    Raises `PreprocessError` (`BadInputError` for a located bad record; `MissingInputError` for an input that does
    not exist), `OSError` naming the output that cannot be written, and leaves nothing new at `output_prefix`.
    """
    started = time.perf_counter()
    # Before the tokenizer is loaded: that imports the hub client, which reads the offline switch once.
    offline_hugging_face()
    output_prefix = Path(output_prefix)
    sources = _check_arguments(inputs, output_prefix, input_format, text_unit, workers)
    outputs = {suffix: with_suffix(output_prefix, suffix) for suffix in (".bin", ".idx", META_SUFFIX)}
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = indexed_dataset().DType.optimal_dtype(tokenizer.vocab_size)
    with temporary_prefix(output_prefix) as temp_prefix:
        temp = {suffix: with_suffix(temp_prefix, suffix) for suffix in outputs}
        _claim(temp[".bin"], outputs[".bin"])
        log(
            f"preprocessing {len(sources)} input(s) with {workers} worker(s); vocabulary {tokenizer.vocab_size}, "
            f"eod {tokenizer.eod}, dtype {np.dtype(dtype).name}"
        )
        # The pool before the writer opens the .bin: forked workers need not inherit it.
        with worker_pool(workers, tokenizer_path, dtype) as pool:
            writer = IndexedWriter(temp[".bin"], dtype, skip_bad, log, output_bin=outputs[".bin"])
            try:
                work = batches(sources, json_key, text_unit)
                _tokenize_into(writer, in_order(pool, work, window=2 * workers + 2), progress, _text_size(sources))
                if writer.documents == 0:
                    raise PreprocessError("no documents to write: every record was skipped")
            except BaseException:
                writer.abandon()
                raise
            writer.finish(temp[".idx"], outputs[".idx"])
        meta = corpus_meta(temp_prefix, tokenizer_fingerprint(tokenizer), writer.documents, writer.tokens, dtype)
        with failures_named(outputs[META_SUFFIX]):
            write_corpus_meta(temp_prefix, meta)
    stats = PreprocessStats(
        documents=writer.documents,
        tokens=writer.tokens,
        skipped=dict(writer.skipped),
        seconds=time.perf_counter() - started,
        bin_path=outputs[".bin"],
        idx_path=outputs[".idx"],
        meta_path=outputs[META_SUFFIX],
    )
    log(stats.summary())
    return stats


def megatron_prefix(output_prefix: Path, json_key: str) -> Path:
    """Where Megatron-LM's preprocess_data.py writes the field `json_key`: ``PREFIX_<key>_document``."""
    output_prefix = Path(output_prefix)
    return output_prefix.with_name(f"{output_prefix.name}_{json_key}_document")


def preprocess_json_keys(
    inputs: list[Path],
    output_prefix: Path,
    tokenizer_path: Path,
    json_keys: list[str],
    input_format: str = "auto",
    **options,
) -> list[PreprocessStats]:
    """`preprocess` once per field of `json_keys`, each into `megatron_prefix(output_prefix, key)` (Megatron-LM's
    `--json-keys` naming); `options` are `preprocess`'s. Every argument is checked before the first corpus is
    written; a failure later leaves the corpora of the keys before it complete, and nothing of its own."""
    keys = _check_json_keys(json_keys)
    sources = resolve_inputs(inputs, input_format)
    texts = [str(source.path) for source in sources if source.format == "text"]
    if texts and len(keys) > 1:
        raise PreprocessError(
            f"--json-keys names {len(keys)} fields but {texts[0]} is a text file, which has one text; "
            f"pass one key (it names the output), or JSON/parquet inputs"
        )
    workers = options.get("workers", 1)
    for key in keys:  # the prefix checks of every output, before any is written
        _check_arguments(
            inputs, megatron_prefix(output_prefix, key), input_format, options.get("text_unit", "file"), workers
        )
    return [
        preprocess(inputs, megatron_prefix(output_prefix, key), tokenizer_path, input_format, key, **options)
        for key in keys
    ]


def _check_json_keys(json_keys: list[str]) -> list[str]:
    keys = list(json_keys)
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    for key in keys:
        if not key or "/" in key or os.sep in key:
            raise PreprocessError(f"--json-keys: {key!r} cannot be part of a file name (PREFIX_<key>_document)")
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise PreprocessError(f"--json-keys names {', '.join(repeated)} more than once")
    return keys


def _claim(temp_bin: Path, output_bin: Path) -> None:
    """Make the output's directory and its temporary .bin now, so that a location that cannot be written (permission
    denied, read-only file system) fails before any input is read."""
    output_bin.parent.mkdir(parents=True, exist_ok=True)  # its error names the directory it could not make
    with failures_named(output_bin):
        temp_bin.touch(exist_ok=False)


def _check_arguments(
    inputs: list[Path], output_prefix: Path, input_format: str, text_unit: str, workers: int
) -> list[InputFile]:
    check_text_unit(text_unit)
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    if output_prefix.suffix in (".bin", ".idx"):
        raise PreprocessError(
            f"the output prefix {output_prefix} ends in {output_prefix.suffix}; pass the prefix only "
            f"({output_prefix.with_suffix('')}), the .bin and .idx are added"
        )
    return resolve_inputs(inputs, input_format)


def _text_size(sources: list[InputFile]) -> int | None:
    """The inputs' size in bytes, the progress total, for uncompressed text and JSON files (JSON's syntax makes the
    display end a little short of it); None where the text's size is not the file's (compressed, parquet, ...)."""
    if any(s.format not in ("text", "jsonl", "json") or s.path.suffix in (".gz", ".xz", ".zst") for s in sources):
        return None
    return sum(s.path.stat().st_size for s in sources)


def _tokenize_into(
    writer: IndexedWriter,
    encoded_batches: Iterator[tuple[InputFile, EncodedBatch]],
    progress: bool,
    total_bytes: int | None = None,
) -> None:
    from megatron_qsparse.progress import progress as show_progress

    started = time.perf_counter()
    # Measured in text bytes against the input size where that is the total; else in documents, without one (a
    # file's documents are known only once it is read).
    unit = "B" if total_bytes else "doc"
    with show_progress(total=total_bytes or None, desc="tokenizing", unit=unit, disable=not progress) as bar:
        for source, encoded in encoded_batches:
            writer.add(source, encoded)
            rate = writer.tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{writer.documents:,} documents, {rate:,.0f} tokens/s", refresh=False)
            bar.update(encoded.text_bytes if total_bytes else len(encoded.lengths))
