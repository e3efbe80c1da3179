"""Preprocessing the committed corpus slice to megatron-core .bin/.idx, read back with IndexedDataset."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The hermetic, offline Hugging Face environment is set in tests/conftest.py.
from megatron_qsparse.data.preprocess import BadInputError, PreprocessError, preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "tests" / "data" / "corpus_slice.jsonl"
SLICE_LINES = SLICE.read_text(encoding="utf-8").splitlines()
TEXTS = [json.loads(line)["text"] for line in SLICE_LINES]


def quiet(message: str) -> None:
    """Swallows preprocess' log lines (tests read the returned stats instead)."""


def run(inputs, prefix: Path, tokenizer_dir: Path, **options):
    return preprocess([Path(p) for p in inputs], prefix, tokenizer_dir, log=quiet, progress=False, **options)


def read_back(prefix: Path):
    """Keep the result alive while using its sequences: they are views of a memory map its __del__ closes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def expected_sequences(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]


# What preprocessing writes at the prefix "slice".
CORPUS_FILES = {"slice.bin", "slice.idx", "slice.meta.json"}


def assert_only(directory: Path, names: set[str]) -> None:
    """The directory holds exactly `names`: no temporary prefix and no partial output."""
    assert {p.name for p in directory.iterdir()} == names


@pytest.fixture(scope="module")
def jsonl_output(tmp_path_factory, tokenizer_dir):
    """The slice preprocessed once with 2 workers; the reference every other route must match."""
    out = tmp_path_factory.mktemp("jsonl")
    stats = run([SLICE], out / "slice", tokenizer_dir, workers=2)
    return out / "slice", stats


def test_jsonl_with_two_workers_reads_back_as_tokens_plus_eod(jsonl_output, tokenizer):
    prefix, stats = jsonl_output
    expected = expected_sequences(tokenizer, TEXTS)
    assert stats.documents == len(TEXTS) == 23
    assert stats.tokens == sum(map(len, expected))
    assert stats.skipped == {}
    assert (stats.bin_path, stats.idx_path) == (prefix.with_name("slice.bin"), prefix.with_name("slice.idx"))
    assert stats.meta_path == prefix.with_name("slice.meta.json")
    assert_only(prefix.parent, CORPUS_FILES)

    dataset = read_back(prefix)
    assert len(dataset) == 23
    assert dataset.index.dtype == np.uint16  # vocabulary 2000 < 65500
    assert dataset.get(0).dtype == np.uint16
    assert dataset.document_indices.tolist() == list(range(24))  # one sequence per document
    assert dataset.sequence_lengths.tolist() == [len(ids) for ids in expected]
    for i in (0, 7, 16, 22):
        assert dataset[i].tolist() == expected[i]
        assert tokenizer.detokenize(dataset[i][:-1]) == TEXTS[i]
    assert (stats.bin_path.stat().st_size) == stats.tokens * 2


def test_one_worker_writes_the_same_bytes_as_two(jsonl_output, tokenizer_dir, tmp_path):
    reference, _ = jsonl_output
    run([SLICE], tmp_path / "one", tokenizer_dir, workers=1)
    assert_same_files(reference, tmp_path / "one")


def assert_same_files(reference: Path, prefix: Path) -> None:
    for suffix in (".bin", ".idx"):
        assert (
            prefix.with_name(prefix.name + suffix).read_bytes()
            == reference.with_name(reference.name + suffix).read_bytes()
        )


def test_one_text_file_per_document_matches_jsonl(jsonl_output, tokenizer_dir, tmp_path):
    files = []
    for i, text in enumerate(TEXTS):
        files.append(tmp_path / f"doc{i:02d}.txt")
        files[-1].write_bytes(text.encode("utf-8"))
    stats = run(files, tmp_path / "out" / "text", tokenizer_dir, workers=2)
    assert stats.documents == 23
    assert_same_files(jsonl_output[0], tmp_path / "out" / "text")


def test_parquet_matches_jsonl(jsonl_output, tokenizer_dir, tmp_path):
    from datasets import Dataset

    Dataset.from_list([json.loads(line) for line in SLICE_LINES]).to_parquet(str(tmp_path / "slice.parquet"))
    run([tmp_path / "slice.parquet"], tmp_path / "pq", tokenizer_dir)
    assert_same_files(jsonl_output[0], tmp_path / "pq")


def test_saved_datasets_directory_matches_jsonl(jsonl_output, tokenizer_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_list([json.loads(line) for line in SLICE_LINES])
    dataset.save_to_disk(str(tmp_path / "saved"))
    run([tmp_path / "saved"], tmp_path / "ds", tokenizer_dir, workers=2)
    assert_same_files(jsonl_output[0], tmp_path / "ds")
    # A DatasetDict of a single split is that split.
    DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    run([tmp_path / "saved_dict"], tmp_path / "dsd", tokenizer_dir, input_format="datasets")
    assert_same_files(jsonl_output[0], tmp_path / "dsd")


def test_text_lines_and_paragraphs_as_documents(tokenizer_dir, tokenizer, tmp_path):
    corpus = tmp_path / "slice.txt"
    corpus.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    lines = [line for text in TEXTS for line in text.split("\n") if line.strip()]
    paragraphs = [paragraph for text in TEXTS for paragraph in text.split("\n\n")]
    for unit, documents in (("line", lines), ("paragraph", paragraphs)):
        stats = run([corpus], tmp_path / unit, tokenizer_dir, text_unit=unit, workers=2)
        dataset = read_back(tmp_path / unit)
        assert stats.documents == len(dataset) == len(documents)
        expected = expected_sequences(tokenizer, documents)
        for i in (0, 1, len(documents) // 2, len(documents) - 1):
            assert dataset[i].tolist() == expected[i]
    assert len(lines) > len(paragraphs) > len(TEXTS)


def write_slice_with(path: Path, bad_line: bytes | None, at: int) -> None:
    """The first 6 slice records with `bad_line` as line `at` (1-based)."""
    lines = [line.encode("utf-8") for line in SLICE_LINES[:6]]
    if bad_line is not None:
        lines.insert(at - 1, bad_line)
    path.write_bytes(b"\n".join(lines) + b"\n")


BAD_CASES = {
    "malformed_json": (b'{"text": "no closing quote}', 4, r"line 4: malformed JSON"),
    "missing_field": (b'{"body": "text under another name"}', 2, r"line 2: no field 'text' \(fields: body\)"),
    "non_string_field": (b'{"text": ["a", "list"]}', 5, r"line 5: field 'text' is a JSON list, not a string"),
    "invalid_utf8": (b'{"text": "caf\xff\xfe au lait"}', 3, r"line 3: bytes that are not valid UTF-8"),
    "empty_file": (None, 1, r"line 1: the file has no documents"),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_input_names_file_and_line_and_leaves_nothing(reason, tokenizer_dir, tmp_path):
    bad_line, at, message = BAD_CASES[reason]
    corpus = tmp_path / f"{reason}.jsonl"
    if reason == "empty_file":
        corpus.write_bytes(b"")
    else:
        write_slice_with(corpus, bad_line, at)
    with pytest.raises(BadInputError, match=rf"{reason}\.jsonl, {message}") as caught:
        run([corpus], tmp_path / "out", tokenizer_dir, workers=2)
    assert (caught.value.reason, caught.value.location) == (reason, at)
    assert "--skip-bad" in str(caught.value)
    assert_only(tmp_path, {corpus.name})


def test_skip_bad_counts_every_reason(tokenizer_dir, tokenizer, tmp_path):
    good = [json.loads(line)["text"] for line in SLICE_LINES[:6]]
    corpus = tmp_path / "mixed.jsonl"
    bad_lines = [BAD_CASES[r][0] for r in ("malformed_json", "missing_field", "non_string_field", "invalid_utf8")]
    lines = [line.encode("utf-8") for line in SLICE_LINES[:6]]
    corpus.write_bytes(b"\n".join(lines[:2] + bad_lines + lines[2:] + [b'{"text": "\\ud800 lone surrogate"}']))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    logged = []
    stats = preprocess(
        [corpus, empty],
        tmp_path / "out",
        tokenizer_dir,
        skip_bad=True,
        workers=2,
        log=logged.append,
        progress=False,
    )
    assert stats.skipped == {
        "malformed_json": 1,
        "missing_field": 1,
        "non_string_field": 1,
        "invalid_utf8": 2,
        "empty_file": 1,
    }
    assert stats.documents == 6
    dataset = read_back(tmp_path / "out")
    assert [dataset[i].tolist() for i in range(6)] == expected_sequences(tokenizer, good)
    assert f"warning: skipped {empty}, line 1: the file has no documents (it is empty or blank)" in logged
    assert f"warning: skipped {corpus}, line 6: bytes that are not valid UTF-8" in logged
    assert "skipped: empty_file 1, invalid_utf8 2, malformed_json 1, missing_field 1, non_string_field 1" in logged[-1]


def test_undecodable_text_file_line_and_skipped_paragraph(tokenizer_dir, tokenizer, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(b"First paragraph.\nStill first.\n\nSecond has caf\xe9 in Latin-1.\n\nThird.\n")
    with pytest.raises(BadInputError, match=r"latin1\.txt, line 4: bytes that are not valid UTF-8"):
        run([corpus], tmp_path / "out", tokenizer_dir, text_unit="paragraph")
    stats = run([corpus], tmp_path / "out", tokenizer_dir, text_unit="paragraph", skip_bad=True)
    assert (stats.documents, stats.skipped) == (2, {"invalid_utf8": 1})
    dataset = read_back(tmp_path / "out")
    assert [dataset[i].tolist() for i in range(2)] == expected_sequences(
        tokenizer, ["First paragraph.\nStill first.", "Third."]
    )


def test_everything_skipped_is_an_error(tokenizer_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(PreprocessError, match="no documents to write"):
        run([tmp_path / "empty.jsonl"], tmp_path / "out", tokenizer_dir, skip_bad=True)
    assert_only(tmp_path, {"empty.jsonl"})


def test_usage_errors(tokenizer_dir, tmp_path):
    with pytest.raises(PreprocessError, match=r"nowhere\.jsonl does not exist"):
        run([tmp_path / "nowhere.jsonl"], tmp_path / "out", tokenizer_dir)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(PreprocessError, match=r"cannot tell the format of .*notes\.csv.*--input-format"):
        run([tmp_path / "notes.csv"], tmp_path / "out", tokenizer_dir)
    with pytest.raises(PreprocessError, match=r"pass the prefix only"):
        run([SLICE], tmp_path / "out.bin", tokenizer_dir)


def test_rerun_replaces_the_previous_output(jsonl_output, tokenizer_dir, tmp_path):
    for suffix in (".bin", ".idx", ".meta.json"):
        (tmp_path / f"slice{suffix}").write_bytes(b"stale")
    run([SLICE], tmp_path / "slice", tokenizer_dir)
    assert_same_files(jsonl_output[0], tmp_path / "slice")
    assert (tmp_path / "slice.meta.json").read_bytes() == jsonl_output[0].with_name("slice.meta.json").read_bytes()
    assert_only(tmp_path, CORPUS_FILES)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_and_summarizes(tokenizer_dir, tmp_path, capsys):
    tool = load_tool("preprocess_data")
    argv = [
        "--input",
        str(SLICE),
        "--tokenizer",
        str(tokenizer_dir),
        "--output-prefix",
        str(tmp_path / "cli"),
        "--workers",
        "2",
    ]
    assert tool.main(argv) == 0
    assert len(read_back(tmp_path / "cli")) == 23
    err = capsys.readouterr().err
    assert "wrote 23 documents" in err and f"-> {tmp_path / 'cli.bin'}, {tmp_path / 'cli.idx'}" in err
    # Progress in a log: text bytes against the input's size (JSON syntax keeps it a little short), then "done".
    shown = [line for line in err.splitlines() if line.startswith("tokenizing: ")]
    size = f"{SLICE.stat().st_size:,}"
    assert shown and all(f"/{size} B" in line for line in shown), shown
    assert ", done (23 documents, " in shown[-1], shown[-1]
    text_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert f" {text_bytes:,}/{size} B" in shown[-1]


def test_cli_exits_2_on_bad_input(tokenizer_dir, tmp_path, capsys):
    tool = load_tool("preprocess_data")
    corpus = tmp_path / "broken.jsonl"
    write_slice_with(corpus, BAD_CASES["malformed_json"][0], 4)
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "o")]
    assert tool.main(argv) == 2
    assert f"error: {corpus}, line 4: malformed JSON" in capsys.readouterr().err
    assert_only(tmp_path, {"broken.jsonl"})
    assert tool.main(argv + ["--skip-bad", "--no-progress"]) == 0
    assert "skipped: malformed_json 1" in capsys.readouterr().err


def test_cli_process_exit_status_without_traceback(tokenizer_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 66  # errors.EXIT_NO_INPUT
    assert (
        result.stderr.splitlines()[-1]
        == f"preprocess_data.py: error: input {tmp_path / 'missing.jsonl'} does not exist"
    )
    assert "Traceback" not in result.stderr


def test_file_names_are_not_glob_patterns(tokenizer_dir, tokenizer, tmp_path):
    # `datasets` expands patterns in data_files: unescaped, "doc[1].txt" would read doc1.txt.
    (tmp_path / "doc1.txt").write_bytes(TEXTS[1].encode("utf-8"))
    (tmp_path / "doc[1].txt").write_bytes(TEXTS[0].encode("utf-8"))
    run([tmp_path / "doc[1].txt"], tmp_path / "out", tokenizer_dir)
    dataset = read_back(tmp_path / "out")
    assert dataset[0].tolist() == expected_sequences(tokenizer, TEXTS[:1])[0]
