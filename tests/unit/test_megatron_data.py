"""Megatron-LM's data interface alongside ours: flat `--data-path` blends, `--split`, `--json-keys` and its
PREFIX_<key>_document naming, compressed and JSON-array inputs, and corpora written by megatron-core itself."""

import gzip
import importlib
import importlib.util
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qsparse.data import readers
from megatron_qsparse.data.gpt_data import build_gpt_datasets
from megatron_qsparse.data.preprocess import PreprocessError, megatron_prefix, preprocess, preprocess_json_keys
from megatron_qsparse.data.readers import iter_document_texts, resolve_inputs
from megatron_qsparse.training.config import ConfigError, build_config, split_weights

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "tests" / "data" / "corpus_slice.jsonl"
RECORDS = [json.loads(line) for line in SLICE.read_text(encoding="utf-8").splitlines() if line.strip()]
TEXTS = [record["text"] for record in RECORDS]


def quiet(message: str) -> None:
    """Swallows preprocess' log lines."""


def read_back(prefix: Path) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_sequences(tokenizer, texts) -> list:
    return [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]


def load_tool():
    spec = importlib.util.spec_from_file_location("tool_preprocess_data", REPO / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_megatron_corpus(prefix: Path, documents, dtype=np.uint16) -> None:
    """A corpus as Megatron-LM writes it: megatron-core's own builder, no sidecar."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def data_config(tmp_path: Path, train, valid=(), **data) -> dict:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir(exist_ok=True)
    return {
        "model": {"preset": "tiny"},
        "data": {"tokenizer": str(tokenizer), "train": list(train), "valid": list(valid), **data},
        "log": {"run_dir": str(tmp_path / "run")},
    }


def empty_corpora(tmp_path: Path, *names: str) -> list:
    prefixes = []
    for name in names:
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}{ext}").write_bytes(b"")
        prefixes.append(str(tmp_path / name))
    return prefixes


# ---- flat blends (Megatron-LM's --data-path 0.3 A 0.7 B) -------------------------------------------------------
def test_flat_blend_reads_like_megatron_core(tmp_path):
    from megatron.core.datasets.utils import get_blend_from_list

    a, b = empty_corpora(tmp_path, "a", "b")
    cfg = build_config(data_config(tmp_path, [0.3, a, 0.7, b], valid=["1", b])).validate(1)
    assert cfg.blend(cfg.data.train, "data.train") == [(0.3, a), (0.7, b)]
    assert cfg.blend(cfg.data.valid, "data.valid") == [(1.0, b)]  # "1": a numeric string is a weight too
    prefixes, weights = get_blend_from_list(["0.3", a, "0.7", b])  # what megatron-core makes of the same list
    assert list(zip(weights, prefixes)) == cfg.blend(cfg.data.train, "data.train")
    # The same from the command line, and the forms that worked before.
    cfg = build_config(data_config(tmp_path, [a]), [f"data.train=[30, {a}, 70, {b}]"]).validate(1)
    assert cfg.blend(cfg.data.train, "data.train") == [(30.0, a), (70.0, b)]
    assert cfg.blend([a, b], "data.train") == [(1.0, a), (1.0, b)]
    assert cfg.blend([[0.3, a], ["0.7", b]], "data.train") == [(0.3, a), (0.7, b)]


@pytest.mark.parametrize(
    "entries,message",
    [
        (["0.3", "A", 0.7], r"data.train: a flat blend .* has an even number of entries, got 3"),
        ([0.3, "A", "heavy", "B"], r"data.train: entry 3 \('heavy'\) is not a number"),
        (["A", 0.3, "B", 0.7], r"data.train: entry 1 \('A'\) is not a number"),
        ([0.3, "A", 0.7, 0.2], r"data.train: entry 4 \(0.2\) is not a prefix"),
        ([0.3, "A", 0, "B"], r"data.train: the weight of B must be > 0, got 0.0"),
        ([0.3, "A", -1, "B"], r"data.train: the weight of B must be > 0, got -1.0"),
    ],
)
def test_malformed_flat_blend_is_one_config_error(tmp_path, entries, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data_config(tmp_path, entries), source="config.yaml").validate(1)


# ---- split (Megatron-LM's --split 969,30,1) ----------------------------------------------------------------
def test_split_is_validated_and_excludes_data_valid(tmp_path):
    (a,) = empty_corpora(tmp_path, "a")
    assert build_config(data_config(tmp_path, [a], split="969,30,1")).validate(1).data.split == "969,30,1"
    cfg = build_config(data_config(tmp_path, [a]), ["data.split=98,2,0"]).validate(1)
    assert split_weights(cfg.data.split) == [98.0, 2.0, 0.0]
    assert split_weights([969, 30, 1]) == [969.0, 30.0, 1.0]
    assert build_config(data_config(tmp_path, [a])).validate(1).data.split is None  # the default: no split
    with pytest.raises(ConfigError, match="data.split: .*data.valid names another held-out set: choose one"):
        build_config(data_config(tmp_path, [a], valid=[a], split="969,30,1"), source="c.yaml").validate(1)
    for bad, message in [
        ("969,30", "is not 3 proportions train,valid,test"),
        ([1, 2, 3, 4], "is not 3 proportions"),
        ("a,b,c", "each of train,valid,test must be a number >= 0"),
        ("90,-5,15", "must be a number >= 0"),
        ("0,0,0", "the train proportion must be > 0"),
        ("0,1,0", "the train proportion must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=f"c.yaml: data.split: .*{message}"):
            build_config(data_config(tmp_path, [a], split=bad), source="c.yaml").validate(1)


class FakeTokenizer:
    """What build_gpt_datasets reads from a tokenizer."""

    vocab_size, eod = 2000, 0


def test_split_holds_out_the_last_documents_of_data_train(tmp_path):
    # Document d is 9 copies of the id 100 + d and an eod: a sample's ids tell which documents it read.
    prefix = tmp_path / "corpus"
    write_megatron_corpus(prefix, [[100 + d] * 9 + [0] for d in range(100)])
    args = ([(1.0, str(prefix))], [], FakeTokenizer(), 8, 1, 40, 16, tmp_path / "cache")
    train, valid = build_gpt_datasets(*args, split=[90, 10, 0])
    ids = lambda dataset: {int(t) for i in range(len(dataset)) for t in dataset[i]["tokens"]} - {0}  # noqa: E731
    assert valid is not None and ids(train) <= set(range(100, 190)) and ids(valid) <= set(range(190, 200))
    assert len(ids(train)) > 80 and len(ids(valid)) >= 8  # both read their part, not a corner of it
    # A test share is held out from both, and no held-out set without a split, as before.
    train, valid = build_gpt_datasets(*args, split=[80, 10, 10])
    assert ids(train) <= set(range(100, 180)) and ids(valid) <= set(range(180, 190))
    assert build_gpt_datasets(*args)[1] is None


# ---- corpora written by megatron-core (Megatron-LM's preprocess_data.py) --------------------------------------
def test_megatron_core_corpus_trains_with_the_exact_token_ids(tmp_path, tokenizer):
    documents = expected_sequences(tokenizer, TEXTS)
    prefix = tmp_path / "my-corpus_text_document"
    write_megatron_corpus(prefix, documents)
    seq = 32
    train, valid = build_gpt_datasets([(1.0, str(prefix))], [], tokenizer, seq, 7, 50, 0, tmp_path / "cache")
    assert valid is None and len(train) >= 50
    assert [train.dataset[d].tolist() for d in range(len(documents))] == documents  # read back as written
    # Samples are windows of seq + 1 ids (tokens, then labels shifted by one) of the documents in the dataset's
    # shuffled document order, in shuffled sample order: each window once, nothing lost or shifted.
    stream = [token for d in train.document_index.tolist() for token in documents[d]]
    starts = []
    for i in range(len(train)):
        sample = train[i]
        assert sample["labels"].tolist()[:-1] == sample["tokens"].tolist()[1:]
        window = sample["tokens"].tolist() + sample["labels"].tolist()[-1:]
        start = seq * int(train.shuffle_index[i])
        assert stream[start : start + seq + 1] == window, i
        starts.append(start)
    assert sorted(starts) == list(range(0, len(train) * seq, seq))


# ---- --json-keys and the PREFIX_<key>_document naming --------------------------------------------------------
@pytest.fixture(scope="module")
def titled_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("titled") / "titled.jsonl"
    records = [{"title": f"Document {i}: {text.split()[0]}", "text": text} for i, text in enumerate(TEXTS[:6])]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_json_keys_writes_one_megatron_named_corpus_per_key(titled_jsonl, tokenizer_dir, tokenizer, tmp_path):
    records = [json.loads(line) for line in titled_jsonl.read_text().splitlines()]
    argv = ["--input", str(titled_jsonl), "--tokenizer", str(tokenizer_dir), "--no-progress"]
    assert (
        load_tool().main(argv + ["--output-prefix", str(tmp_path / "my-corpus"), "--json-keys", "text", "title"]) == 0
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        f"my-corpus_{key}_document{ext}" for key in ("text", "title") for ext in (".bin", ".idx", ".meta.json")
    }
    for key in ("text", "title"):
        expected = expected_sequences(tokenizer, [record[key] for record in records])
        assert read_back(tmp_path / f"my-corpus_{key}_document") == expected
    # --json-key keeps our naming: PREFIX.bin/.idx exactly.
    assert load_tool().main(argv + ["--output-prefix", str(tmp_path / "ours"), "--json-key", "title"]) == 0
    assert read_back(tmp_path / "ours") == read_back(tmp_path / "my-corpus_title_document")


def test_json_keys_refusals(titled_jsonl, tokenizer_dir, tmp_path, capsys):
    common = ["--input", str(titled_jsonl), "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as caught:
        load_tool().main(common + ["--json-key", "text", "--json-keys", "title"])
    assert caught.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert load_tool().main(common + ["--json-keys", "text", "text"]) == 2
    assert "--json-keys names text more than once" in capsys.readouterr().err
    text = tmp_path / "plain.txt"
    text.write_text("one text\n", encoding="utf-8")
    with pytest.raises(PreprocessError, match="plain.txt is a text file, which has one text"):
        preprocess_json_keys([text], tmp_path / "o", tokenizer_dir, ["text", "title"], log=quiet, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"plain.txt"}  # refused before anything was written
    assert megatron_prefix(Path("data/corpus.v2"), "text") == Path("data/corpus.v2_text_document")


def test_missing_prefix_hints_at_the_text_document_files(tmp_path):
    (written,) = empty_corpora(tmp_path, "my-corpus_text_document")
    given = str(tmp_path / "my-corpus")
    with pytest.raises(ConfigError) as caught:
        build_config(data_config(tmp_path, [0.5, given])).validate(1)
    message = str(caught.value)
    assert f"data.train: {given}.bin does not exist; did you mean {written}?" in message
    assert "PREFIX_<key>_document" in message
    with pytest.raises(ConfigError, match=r"data.valid: .*elsewhere.bin does not exist$"):  # no hint to give
        build_config(data_config(tmp_path, [written], valid=[str(tmp_path / "elsewhere")])).validate(1)


# ---- compressed inputs ----------------------------------------------------------------------------------------
COMPRESSORS = {".gz": gzip.compress, ".xz": lzma.compress}


@pytest.mark.parametrize("extension", sorted(COMPRESSORS))
def test_compressed_jsonl_reads_like_the_plain_file(tmp_path, extension):
    path = tmp_path / f"slice.jsonl{extension}"
    path.write_bytes(COMPRESSORS[extension](SLICE.read_bytes()))
    assert resolve_inputs([path])[0].format == "jsonl"
    assert list(iter_document_texts([path])) == TEXTS
    text = tmp_path / f"notes.txt{extension}"
    text.write_bytes(COMPRESSORS[extension]("first paragraph\r\nstill first\n\nsecond\n".encode()))
    assert list(iter_document_texts([text], text_unit="paragraph")) == ["first paragraph\nstill first", "second"]
    assert list(iter_document_texts([text])) == ["first paragraph\nstill first\n\nsecond\n"]


def test_compressed_jsonl_preprocesses_to_the_same_corpus(tmp_path, tokenizer_dir):
    path = tmp_path / "slice.jsonl.gz"
    path.write_bytes(gzip.compress(SLICE.read_bytes()))
    for source, prefix in ((SLICE, tmp_path / "plain"), (path, tmp_path / "packed")):
        preprocess([source], prefix, tokenizer_dir, log=quiet, progress=False)
    assert (tmp_path / "packed.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()
    assert (tmp_path / "packed.idx").read_bytes() == (tmp_path / "plain.idx").read_bytes()


def test_compressed_bad_lines_are_located_by_their_line(tmp_path):
    lines = SLICE.read_bytes().splitlines(keepends=True)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b"".join(lines[:3] + [b"\n", b'{"text": "cut\n'] + lines[3:])))
    with pytest.raises(PreprocessError, match=rf"{broken}, line 5: malformed JSON"):
        list(iter_document_texts([broken]))
    latin = tmp_path / "latin.jsonl.xz"
    latin.write_bytes(lzma.compress(b"".join(lines[:6] + ['{"text": "caf\xe9"}\n'.encode("latin-1")] + lines[6:])))
    with pytest.raises(PreprocessError, match=rf"{latin}, line 7: bytes that are not valid UTF-8"):
        list(iter_document_texts([latin]))
    skipped = readers.SkippedRecords(skip_bad=True, log=quiet)
    assert len(list(iter_document_texts([latin], on_bad=skipped))) == len(TEXTS)
    assert dict(skipped.counts) == {"invalid_utf8": 1}


def test_damaged_compressed_input_is_named_not_called_latin1(tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(SLICE.read_bytes())[:2000])
    with pytest.raises(PreprocessError, match=rf"input {truncated}: cannot decompress it as gzip .*gzip -t"):
        list(iter_document_texts([truncated]))
    mislabeled = tmp_path / "plain.jsonl.xz"
    mislabeled.write_bytes(SLICE.read_bytes())
    with pytest.raises(PreprocessError, match="cannot decompress it as xz .* not xz-compressed"):
        list(iter_document_texts([mislabeled]))
    with pytest.raises(PreprocessError, match="a compressed parquet file cannot be read"):
        resolve_inputs([_touch(tmp_path / "t.parquet.gz")])


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def zstd_compress():
    """The `compress` of Python 3.14's compression.zstd or of the zstandard package, None without either."""
    for module in ("compression.zstd", "zstandard"):
        try:
            return importlib.import_module(module).compress
        except ImportError:
            continue
    return None


def test_zstd_reads_or_names_the_package_to_install(tmp_path):
    path = tmp_path / "slice.jsonl.zst"
    compress = zstd_compress()
    if compress is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")  # the zstd magic: the file is not opened without a zstd module
        with pytest.raises(PreprocessError, match=r"slice.jsonl.zst: reading .zst files needs the zstandard package"):
            list(iter_document_texts([path]))
        return
    path.write_bytes(compress(SLICE.read_bytes()))
    assert list(iter_document_texts([path])) == TEXTS


# ---- JSON arrays ------------------------------------------------------------------------------------------------
def test_json_array_file_reads_every_record_in_order(tmp_path, tokenizer_dir):
    array = tmp_path / "slice.json"
    array.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    assert resolve_inputs([array])[0].format == "json"
    assert list(iter_document_texts([array])) == TEXTS
    packed = tmp_path / "slice.json.gz"
    packed.write_bytes(gzip.compress(array.read_bytes()))
    assert list(iter_document_texts([packed])) == TEXTS
    lines = tmp_path / "lines.json"  # a .json of JSON lines (Megatron-LM's usual input) stays JSON lines
    lines.write_bytes(SLICE.read_bytes())
    assert resolve_inputs([lines])[0].format == "jsonl" and list(iter_document_texts([lines])) == TEXTS
    preprocess([array], tmp_path / "from_array", tokenizer_dir, log=quiet, progress=False)
    preprocess([SLICE], tmp_path / "from_lines", tokenizer_dir, log=quiet, progress=False)
    assert (tmp_path / "from_array.bin").read_bytes() == (tmp_path / "from_lines.bin").read_bytes()


@pytest.mark.parametrize("read_characters", [1, 5, 64, 1 << 20])
def test_json_array_elements_split_across_reads(tmp_path, read_characters):
    tricky = [{"text": 'quote " brace } bracket ] backslash \\ é\n', "n": [1, {"x": "]"}]}, {"text": "plain"}]
    path = tmp_path / "tricky.json"
    path.write_text("\ufeff[\n " + ",\n\n ".join(json.dumps(r) for r in tricky) + "\n]\n", encoding="utf-8")
    records = list(readers._json_array_records(path, read_characters))
    assert [(line, json.loads(text)) for line, text in records] == [(2, tricky[0]), (4, tricky[1])]


def test_json_array_bad_elements_are_located(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "ok"},\n  {"txt": "no field"},\n  {"text": "ok"} {"text": "x"}\n]', "utf-8")
    with pytest.raises(PreprocessError, match=rf"{path}, line 3: no field 'text'"):
        list(iter_document_texts([path]))
    skipped = readers.SkippedRecords(skip_bad=True, log=quiet)
    assert list(iter_document_texts([path], on_bad=skipped)) == ["ok", "ok"]
    assert dict(skipped.counts) == {"missing_field": 1, "malformed_json": 1}
    truncated = tmp_path / "cut.json"
    truncated.write_text('[{"text": "ok"}, {"text": "never clo', "utf-8")
    with pytest.raises(PreprocessError, match=rf"{truncated}, line 1: the file ends inside this element"):
        list(iter_document_texts([truncated]))
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"text": "ok"},\n\n {"text": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(PreprocessError, match=rf"{latin}, line 3: bytes that are not valid UTF-8"):
        list(iter_document_texts([latin]))
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ", "utf-8")
    with pytest.raises(PreprocessError, match="empty.json, line 1: the file has no documents"):
        list(iter_document_texts([empty]))
