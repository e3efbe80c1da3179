"""Byte-level BPE training on the committed corpus slice, the megatron-facing adapter, and the training CLI."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# The hermetic, offline Hugging Face environment is set in tests/conftest.py.
from megatron_qsparse.data.preprocess import BadInputError  # noqa: E402
from megatron_qsparse.data.tokenizer import (  # noqa: E402
    END_OF_TEXT,
    TokenizerError,
    load_tokenizer,
    train_bpe_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "tests" / "data" / "corpus_slice.jsonl"


def slice_texts() -> list[str]:
    return [json.loads(line)["text"] for line in SLICE.read_text(encoding="utf-8").splitlines()]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_directory_is_a_complete_hf_tokenizer(tokenizer_dir):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # Built beside the output and renamed: no staging directory is left behind.
    assert [p.name for p in tokenizer_dir.parent.iterdir()] == ["bpe2k"]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == END_OF_TEXT and config["pad_token"] == END_OF_TEXT


def test_vocabulary_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == 2000
    eot = tokenizer.hf.get_vocab()[END_OF_TEXT]
    assert eot == 0  # the only special token comes first
    assert tokenizer.eod == eot
    assert tokenizer.pad == eot


def test_round_trip_is_exact_on_every_slice_document(tokenizer):
    texts = slice_texts()
    for text in texts:
        ids = tokenizer.tokenize(text)
        assert tokenizer.eod not in ids  # no special tokens are added
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize_batch(texts[:5]) == [tokenizer.tokenize(t) for t in texts[:5]]


def test_merges_were_learned(tokenizer):
    text = "\n\n".join(slice_texts())
    bytes_per_token = len(text.encode("utf-8")) / len(tokenizer.tokenize(text))
    # A byte-level vocabulary of 2000 on English prose: ~3 bytes per token (1.0 would mean no merges).
    assert 2.5 < bytes_per_token < 5.0


def test_special_token_text_inside_a_document_is_not_eod(tokenizer):
    text = f"the model printed {END_OF_TEXT} and kept going"
    ids = tokenizer.tokenize(text)
    assert tokenizer.eod not in ids
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize([tokenizer.eod]) == END_OF_TEXT


def test_unseen_characters_still_round_trip(tokenizer):
    text = "Ünïcödé 漢字 🙂 \t tabs\r\n and \x00 bytes"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def save_bpe_with_specials(directory: Path, special_tokens: list[str], **special_roles) -> Path:
    """A small HF tokenizer directory in the shape of a foreign one (e.g. Llama's <s>/</s>, no pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(slice_texts()[:3], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles).save_pretrained(str(directory))
    return directory


def test_foreign_tokenizer_uses_its_eos_and_falls_back_to_it_for_pad(tmp_path):
    directory = save_bpe_with_specials(tmp_path / "llama_like", ["<unk>", "<s>", "</s>"], eos_token="</s>")
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eod == 2
    assert tokenizer.pad == 2
    assert tokenizer.vocab_size == 400


def test_end_of_text_is_eod_when_no_eos_is_set(tmp_path):
    directory = save_bpe_with_specials(tmp_path / "no_eos", ["<pad>", END_OF_TEXT], pad_token="<pad>")
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eod == 1
    assert tokenizer.pad == 0


def test_tokenizer_without_any_end_of_document_is_refused(tmp_path):
    directory = save_bpe_with_specials(tmp_path / "none", ["<pad>"], pad_token="<pad>")
    with pytest.raises(TokenizerError, match=r"none.*no end-of-document token"):
        load_tokenizer(directory)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing_dir does not exist"):
        load_tokenizer(tmp_path / "missing_dir")
    (tmp_path / "not_a_tokenizer").mkdir()
    (tmp_path / "not_a_tokenizer" / "notes.txt").write_text("hello")
    with pytest.raises(TokenizerError, match=r"not_a_tokenizer is not a Hugging Face tokenizer directory"):
        load_tokenizer(tmp_path / "not_a_tokenizer")


def test_training_refuses_bad_requests(tmp_path):
    with pytest.raises(TokenizerError, match="at least 257"):
        train_bpe_tokenizer([SLICE], tmp_path / "tiny", vocab_size=100)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(TokenizerError, match="occupied already exists"):
        train_bpe_tokenizer([SLICE], occupied, vocab_size=300)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_training_on_a_bad_json_line_names_file_and_line(tmp_path):
    corpus = tmp_path / "broken.jsonl"
    lines = SLICE.read_text(encoding="utf-8").splitlines()[:3] + ['{"text": "unterminated']
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=r"broken\.jsonl, line 4: malformed JSON"):
        train_bpe_tokenizer([corpus], tmp_path / "out", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl"]


def test_training_on_text_files(tmp_path):
    corpus = tmp_path / "slice.txt"
    corpus.write_text("\n\n".join(slice_texts()), encoding="utf-8")
    tokenizer = load_tokenizer(train_bpe_tokenizer([corpus], tmp_path / "from_text", vocab_size=600))
    assert tokenizer.vocab_size == 600
    text = slice_texts()[0]
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_cli_trains_and_reports(tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    output = tmp_path / "cli_tok"
    assert tool.main(["--input", str(SLICE), "--output", str(output), "--vocab-size", "500"]) == 0
    assert load_tokenizer(output).vocab_size == 500
    assert f"saved {output}: vocabulary 500, eod 0" in capsys.readouterr().err


def test_cli_exits_2_with_the_message_on_bad_input(tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert tool.main(["--input", str(empty), "--output", str(tmp_path / "out")]) == 2
    assert f"error: {empty}, line 1: the file has no documents" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_cli_process_exit_status_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_tokenizer.py"),
            "--input",
            str(tmp_path / "missing.txt"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 66  # errors.EXIT_NO_INPUT
    assert (
        result.stderr.splitlines()[-1] == f"train_tokenizer.py: error: input {tmp_path / 'missing.txt'} does not exist"
    )
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the output is claimed only once the inputs exist
