"""Preprocessing and tokenizer training when things go wrong or get big: an output that cannot be written, a full
disk, SIGINT/SIGTERM mid-run, a document of many megabytes; and the corpus sidecar recording the tokenizer."""

import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# The hermetic, offline Hugging Face environment is set in tests/conftest.py.
import megatron_qsparse.data.preprocess as preprocess_module
import megatron_qsparse.data.readers as readers
import megatron_qsparse.data.tokenizer as tokenizer_module
import megatron_qsparse.data.tokenizing as tokenizing
from megatron_qsparse.data.indexed import read_corpus_meta
from megatron_qsparse.data.preprocess import preprocess
from megatron_qsparse.data.readers import text_pieces
from megatron_qsparse.data.tokenizer import load_tokenizer, tokenizer_fingerprint, vocab_sha256
from megatron_qsparse.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "tests" / "data" / "corpus_slice.jsonl"
SLICE_LINES = SLICE.read_text(encoding="utf-8").splitlines()
TEXTS = [json.loads(line)["text"] for line in SLICE_LINES]
TOOLS = {"preprocess": "preprocess_data", "tokenizer": "train_tokenizer"}


def quiet(message: str) -> None:
    """Swallows preprocess' log lines."""


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_argv(kind: str, inputs: list[Path], output: Path, tokenizer_dir: Path) -> list[str]:
    """The command line of `kind`'s tool, writing to `output` (a prefix, or the tokenizer directory)."""
    script = str(REPO / "tools" / f"{TOOLS[kind]}.py")
    if kind == "preprocess":
        rest = ["--tokenizer", str(tokenizer_dir), "--output-prefix", str(output), "--no-progress"]
    else:
        rest = ["--output", str(output), "--vocab-size", "400"]
    return [sys.executable, script, "--input", *map(str, inputs), *rest]


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def write_jsonl(path: Path, megabytes: float) -> Path:
    """The slice's records, repeated to about `megabytes` MB of JSON lines."""
    lines, size = [], 0
    while size < megabytes * 1e6:
        for line in SLICE_LINES:
            lines.append(line)
            size += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_document(megabytes: float) -> str:
    """The slice's texts as one document without blank lines (one paragraph, too) of about `megabytes` MB."""
    block = "\n".join(TEXTS).replace("\n\n", "\n")
    return "\n".join([block] * int(megabytes * 1e6 / len(block) + 1))


# ---------------------------------------------------------------------------------------------------------------
# Pieces of long documents


def test_text_pieces_join_back_and_end_before_a_space_after_a_word():
    text = one_document(0.05) + "  two  spaces\tand a tab"
    pieces = list(text_pieces(text, 700))
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= 700 for piece in pieces)
    assert len(pieces) > len(text) / 700
    for piece, following in zip(pieces, pieces[1:]):
        assert following[0] in " \t\xa0" and not piece[-1].isspace()  # the slice spaces with no-break spaces too
    assert list(text_pieces("short", 700)) == ["short"]


def test_text_pieces_fall_back_to_line_breaks_then_to_a_hard_cut():
    no_spaces = "\n".join(["x" * 90, "x" * 89 + "."] * 15)  # lines without spaces, some ending in punctuation
    pieces = list(text_pieces(no_spaces, 200))
    assert "".join(pieces) == no_spaces
    assert all(piece.endswith("x") and len(piece) <= 200 for piece in pieces[:-1])  # after a letter, not a "."
    assert all(following.startswith("\n") for following in pieces[1:])
    assert list(text_pieces("." * 150 + "\n" + "." * 100, 200)) == ["." * 150, "\n" + "." * 100]
    assert list(text_pieces("y" * 500, 200)) == ["y" * 200, "y" * 200, "y" * 100]


def test_undecodable_lines_are_numbered_across_small_chunks(tmp_path):
    data = b"ok\r\nbad \xff\rok\nok\n\nbad \xe9 and \xfe\r\n" + b"long " * 300 + b"\xc3\n\xc3\xa9 fine"
    path = tmp_path / "mixed.txt"
    path.write_bytes(data)
    expected = {n for n, line in enumerate(data.splitlines(), 1) if not readers._is_utf8(line)}
    assert expected == {2, 6, 7}
    for chunk in (1, 3, 64, 1 << 22):
        assert readers._undecodable_lines(path, chunk_characters=chunk) == expected


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2000 characters, tokenizer calls of at most 5000: a few hundred pieces per test document. Set
    before the pool forks, so its workers have them too."""
    monkeypatch.setattr(readers, "DOCUMENT_PIECE_CHARACTERS", 2000)
    monkeypatch.setattr(tokenizing, "BATCH_CHARACTERS", 5000)


def long_document() -> str:
    """About 1.2 MB of real text with runs of spaces, tabs, Windows line breaks and lines without spaces."""
    parts = [one_document(0.5), "  double  spaces,\ttabs\t\tand\r\nWindows\r\nbreaks\r\n", one_document(0.5)]
    parts.insert(1, "\n".join(["a_line_without_any_space_" * 20] * 40))
    return "".join(parts)


def test_a_text_file_streamed_in_pieces_reads_back_whole(small_pieces, tmp_path):
    text = long_document()
    (tmp_path / "long.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a byte-order mark
    (tmp_path / "blank.txt").write_text(" \n" * 3000)
    records = list(readers.iter_records(readers.InputFile(tmp_path / "long.txt", "text")))
    assert len(records) > 500 and all(len(piece.text) <= 2000 for _, piece in records)
    assert [piece.last for _, piece in records] == [False] * (len(records) - 1) + [True]
    whole = text.replace("\r\n", "\n")
    assert list(readers.iter_document_texts([tmp_path / "long.txt"])) == [whole]
    assert "".join(readers.iter_text_pieces([tmp_path / "long.txt"], limit=500)) == whole
    with pytest.raises(readers.BadInputError, match=r"blank\.txt, line 1: the file has no documents"):
        list(readers.iter_document_texts([tmp_path / "blank.txt"]))


def test_a_long_text_file_in_small_pieces_is_one_document_tokenized_as_the_whole(
    small_pieces, tokenizer_dir, tokenizer, tmp_path
):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text = long_document()
    (tmp_path / "long.txt").write_bytes(text.encode("utf-8"))
    stats = preprocess([tmp_path / "long.txt"], tmp_path / "small", tokenizer_dir, workers=2, log=quiet, progress=False)
    whole = text.replace("\r\n", "\n")  # read with universal newlines, as `datasets` reads a document
    expected = tokenizer.tokenize(whole) + [tokenizer.eod]
    assert stats.documents == 1 and stats.tokens == len(expected)
    dataset = IndexedDataset(str(tmp_path / "small"))
    assert dataset.sequence_lengths.tolist() == [len(expected)]
    assert dataset.document_indices.tolist() == [0, 1]
    assert dataset[0].tolist() == expected


def test_a_long_json_record_in_small_pieces_tokenizes_as_the_whole(small_pieces, tokenizer_dir, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [TEXTS[0], long_document()[:300_000], TEXTS[1]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    preprocess([tmp_path / "c.jsonl"], tmp_path / "c", tokenizer_dir, workers=2, log=quiet, progress=False)
    dataset = IndexedDataset(str(tmp_path / "c"))
    assert [dataset[i].tolist() for i in range(3)] == [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]


def test_bin_and_idx_are_exactly_what_megatron_cores_builder_writes(tokenizer_dir, tokenizer, tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    preprocess([SLICE], tmp_path / "ours", tokenizer_dir, log=quiet, progress=False)
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in TEXTS:
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        reference.add_document(torch.tensor(ids), [len(ids)])
    reference.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# The sidecar


def test_the_sidecar_records_the_tokenizer_and_the_files(tokenizer_dir, tokenizer, tmp_path):
    stats = preprocess([SLICE], tmp_path / "c", tokenizer_dir, log=quiet, progress=False)
    meta = read_corpus_meta(tmp_path / "c")
    assert json.loads((tmp_path / "c.meta.json").read_text()) == meta
    vocab = json.dumps(sorted(tokenizer.hf.get_vocab().items()), separators=(",", ":"))
    assert meta == {
        "format": 1,
        "tokenizer": {
            "path": str(tokenizer_dir),
            "vocab_size": 2000,
            "vocab_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
            "eod": 0,
        },
        "documents": 23,
        "tokens": stats.tokens,
        "dtype": "uint16",
        "bin_size": stats.tokens * 2,
        "idx_size": (tmp_path / "c.idx").stat().st_size,
    }
    assert meta["tokenizer"] == tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer_dir)


def test_fingerprints_follow_the_vocabulary_not_the_place(tokenizer_dir, tmp_path):
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path / "moved")
    moved = tokenizer_fingerprint(tmp_path / "moved")
    assert moved["path"] == str(tmp_path / "moved")
    assert moved["vocab_sha256"] == vocab_sha256(tokenizer_dir)
    halves = []
    for name, lines in (("first", SLICE_LINES[:12]), ("second", SLICE_LINES[12:])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        halves.append(tokenizer_module.train_bpe_tokenizer([tmp_path / f"{name}.jsonl"], tmp_path / name, 500))
    first, second = (tokenizer_fingerprint(half) for half in halves)
    assert first["vocab_size"] == second["vocab_size"] == 500
    assert first["vocab_sha256"] != second["vocab_sha256"]


def test_a_corpus_without_a_sidecar_reads_as_none_and_a_bad_sidecar_is_refused(tmp_path):
    assert read_corpus_meta(tmp_path / "megatron_lm_corpus") is None
    for content, message in (
        ("{not json", "not a corpus description"),
        ('["a list"]', 'no "tokenizer" object'),
        ('{"format": 2, "tokenizer": {}}', "format 2, this version reads 1"),
    ):
        (tmp_path / "c.meta.json").write_text(content)
        with pytest.raises(DataError, match=message) as caught:
            read_corpus_meta(tmp_path / "c")
        assert str(tmp_path / "c.meta.json") in str(caught.value) and "preprocess_data.py" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written, missing inputs


def _drop_dac_override() -> None:
    """preexec_fn: the program exec'd next lacks CAP_DAC_OVERRIDE (dropped from the bounding set), so even as root
    it obeys file permissions, as an ordinary user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override = 24, 1
    if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only_directory(tmp_path):
    """(a directory with mode 0555, the preexec_fn a child needs to be refused writing there)."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o555)
    preexec = _drop_dac_override if os.geteuid() == 0 else None
    probe = [sys.executable, "-c", f"open({str(directory / 'probe')!r}, 'w')"]
    try:
        refused = subprocess.run(probe, preexec_fn=preexec, capture_output=True, text=True).returncode != 0
    except subprocess.SubprocessError:  # prctl refused: no CAP_SETPCAP
        refused = False
    if not refused:
        directory.chmod(0o755)
        pytest.skip("cannot make a directory this test's processes may not write")
    yield directory, preexec
    directory.chmod(0o755)


@pytest.mark.parametrize("kind", sorted(TOOLS))
def test_an_unwritable_output_fails_at_once_in_one_line(kind, read_only_directory, tokenizer_dir, tmp_path):
    directory, preexec = read_only_directory
    # A bad last record: reached only if the command read its input before trying its output.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(SLICE_LINES[:3] + ['{"text": "unterminated']) + "\n", encoding="utf-8")
    output = directory / ("corpus" if kind == "preprocess" else "tok")
    argv = tool_argv(kind, [corpus], output, tokenizer_dir)
    result = subprocess.run(argv, preexec_fn=preexec, capture_output=True, text=True, timeout=120)
    assert result.returncode == 73, result.stderr  # errors.EXIT_CANT_CREATE
    named = f"{output}.bin" if kind == "preprocess" else str(output)
    assert error_lines(result.stderr) == [f"{TOOLS[kind]}.py: error: {named}: permission denied"]
    assert entries(directory) == set()


def test_a_missing_tokenizer_is_exit_66_and_creates_nothing(tmp_path):
    argv = tool_argv("preprocess", [SLICE], tmp_path / "new_dir" / "corpus", tmp_path / "no_tokenizer")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 66  # errors.EXIT_NO_INPUT
    assert error_lines(result.stderr) == [
        f"preprocess_data.py: error: tokenizer directory {tmp_path / 'no_tokenizer'} does not exist"
    ]
    assert entries(tmp_path) == set()


@pytest.fixture
def full_disk():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to stand for a full disk")
    return Path("/dev/full")


def test_a_full_disk_while_preprocessing_is_one_line_exit_74(full_disk, tokenizer_dir, tmp_path, monkeypatch, capsys):
    claim = preprocess_module._claim

    def claim_on_a_full_disk(temp_bin: Path, output_bin: Path) -> None:
        claim(temp_bin, output_bin)
        temp_bin.unlink()
        temp_bin.symlink_to(full_disk)  # every write to the .bin fails as on a full disk: ENOSPC

    monkeypatch.setattr(preprocess_module, "_claim", claim_on_a_full_disk)
    argv = tool_argv("preprocess", [SLICE], tmp_path / "corpus", tokenizer_dir)[2:]
    assert load_tool("preprocess_data").main(argv) == 74  # errors.EXIT_IO
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"preprocess_data.py: error: {tmp_path / 'corpus.bin'}: no space left on device (")
    assert line.endswith(" MiB free); free space or choose another location")
    assert entries(tmp_path) == set()


def test_a_full_disk_while_saving_a_tokenizer_is_one_line_exit_74(full_disk, tmp_path, monkeypatch, capsys):
    make_directory = tokenizer_module.atomic_directory

    @contextlib.contextmanager
    def on_a_full_disk(output, replace=False):
        with make_directory(output, replace) as staging:
            for name in ("tokenizer_config.json", "tokenizer.json"):
                (staging / name).symlink_to(full_disk)
            yield staging

    monkeypatch.setattr(tokenizer_module, "atomic_directory", on_a_full_disk)
    argv = tool_argv("tokenizer", [SLICE], tmp_path / "tok", Path())[2:]
    assert load_tool("train_tokenizer").main(argv) == 74  # errors.EXIT_IO
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"train_tokenizer.py: error: {tmp_path / 'tok'}: no space left on device (")
    assert entries(tmp_path) == set()


def test_a_rust_os_error_is_named_like_a_python_one(tmp_path):
    with pytest.raises(OSError) as caught, tokenizer_module.failures_named(tmp_path / "tok"):
        raise Exception("No space left on device (os error 28)")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / "tok"))
    with pytest.raises(Exception, match="unrelated"), tokenizer_module.failures_named(tmp_path):
        raise Exception("unrelated")


# ---------------------------------------------------------------------------------------------------------------
# SIGINT and SIGTERM mid-run


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """16 MB of JSON lines: many seconds of work even on a fast machine, so a signal a moment after the start lands
    mid-run."""
    return write_jsonl(tmp_path_factory.mktemp("big") / "big.jsonl", 16)


def wait_for_temporary(process: subprocess.Popen, directory: Path, timeout: float = 120) -> Path:
    """The hidden temporary the command makes beside its output, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hidden = [p for p in directory.iterdir() if p.name.startswith(".")]
        if hidden:
            return hidden[0]
        if process.poll() is not None:
            pytest.fail(f"the command ended before making its temporary: {process.communicate()[1]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no temporary appeared")


@pytest.mark.parametrize("kind", sorted(TOOLS))
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_removes_the_temporaries(kind, signal_name, big_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = tool_argv(kind, [big_corpus], out / ("corpus" if kind == "preprocess" else "tok"), tokenizer_dir)
    # A session of its own: SIGINT goes to the whole group, workers included, as Ctrl-C does.
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    temporary = wait_for_temporary(process, out)
    time.sleep(0.5)  # past the start: reading, tokenizing, training
    if signal_name == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)  # `kill PID`
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == {"SIGINT": 130, "SIGTERM": 143}[signal_name], stderr
    assert entries(out) == set(), f"{temporary.name} was left behind"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    ending = "interrupted" if signal_name == "SIGINT" else "terminated (SIGTERM); the partial output was removed"
    assert stderr.splitlines()[-1] == f"{TOOLS[kind]}.py: {ending}"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer training's --skip-bad


def test_train_tokenizer_skips_bad_records_with_skip_bad(tmp_path, capsys):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("\n".join(SLICE_LINES[:8] + ['{"text": "unterminated', '{"body": "x"}']) + "\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    tool = load_tool("train_tokenizer")
    argv = ["--input", str(corpus), str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "tok"), "--vocab-size"]
    assert tool.main([*argv, "400"]) == 2
    assert "--skip-bad" in capsys.readouterr().err
    assert tool.main([*argv, "400", "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {corpus}, line 9: malformed JSON" in err
    assert f"warning: skipped {tmp_path / 'empty.jsonl'}, line 1: the file has no documents" in err
    assert "skipped: empty_file 1, malformed_json 1, missing_field 1" in err
    assert load_tokenizer(tmp_path / "tok").vocab_size == 400


def test_train_tokenizer_checks_its_inputs_before_making_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "atomic_directory", lambda *args: pytest.fail("output made first"))
    with pytest.raises(readers.MissingInputError, match=r"missing\.txt does not exist"):
        tokenizer_module.train_bpe_tokenizer([tmp_path / "missing.txt"], tmp_path / "tok", 300)


def test_train_tokenizer_refuses_to_train_when_everything_was_skipped(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(tokenizer_module.TokenizerError, match="every record was skipped"):
        tokenizer_module.train_bpe_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "tok", 300, skip_bad=True, log=quiet)
    assert entries(tmp_path) == {"bad.jsonl"}


# ---------------------------------------------------------------------------------------------------------------
# Peak memory with one long document


def peak_memory_mib(argv: list[str]) -> float:
    """The largest resident set of `argv`'s processes (workers included), in MiB; the command must succeed."""
    measure = (
        "import resource, subprocess, sys; result = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(result.stderr[-2000:], file=sys.stderr); "
        "sys.exit(result.returncode)"
    )
    result = subprocess.run([sys.executable, "-c", measure, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_preprocessing_one_long_document_holds_pieces_not_the_document(tokenizer_dir, tmp_path):
    # 6 MB here peaked near 1.4 GiB when documents were tokenized whole (50 MB: 7.7 GB); pieces: about 0.5 GiB.
    (tmp_path / "long.txt").write_text(one_document(6), encoding="utf-8")
    argv = tool_argv("preprocess", [tmp_path / "long.txt"], tmp_path / "long", tokenizer_dir) + ["--workers", "2"]
    assert peak_memory_mib(argv) < 1024
    meta = read_corpus_meta(tmp_path / "long")
    assert meta["documents"] == 1 and meta["tokens"] > 1_500_000


@pytest.mark.slow
def test_training_a_tokenizer_on_one_long_document_holds_pieces_not_the_document(tmp_path):
    # 12 MB (one paragraph) here peaked near 1.5 GiB when given to the trainer whole (50 MB: 5.2 GB).
    (tmp_path / "long.txt").write_text(one_document(12), encoding="utf-8")
    argv = tool_argv("tokenizer", [tmp_path / "long.txt"], tmp_path / "tok", Path())
    assert peak_memory_mib(argv) < 1024
    assert load_tokenizer(tmp_path / "tok").vocab_size == 400
