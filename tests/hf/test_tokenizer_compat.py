"""Every tokenizer directory the project writes (tools/train_tokenizer.py's, the one in an HF export, the one beside
an import) loads under transformers 5 (the project's) and 4.57 (installed for the test into a private directory),
directly and through megatron-core's HuggingFaceTokenizer, and gives the same ids on real text everywhere.

transformers 5 names its fast tokenizer class "TokenizersBackend" in tokenizer_config.json; 4.x does not have it
("Tokenizer class TokenizersBackend does not exist"). Run as a script (the 4.57 side):
    PYTHONPATH=TARGET python test_tokenizer_compat.py DIRECTORY...   prints {directory: what each loader gives}
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SLICE = Path(__file__).resolve().parents[1] / "data" / "corpus_slice.jsonl"
# The last 4.57 release, and what it requires that the project's environment has too new: tokenizers<=0.23.0,
# huggingface-hub<1.0 (its other requirements are met there).
TRANSFORMERS_4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2")
# What pip says when it cannot reach the index (then the test skips; any other failure fails it).
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
)
END_OF_TEXT = "<|endoftext|>"


def real_text() -> str:
    """The first two paragraphs of the slice (curly quotes and apostrophes included: byte-level pieces)."""
    first = json.loads(SLICE.read_text(encoding="utf-8").splitlines()[0])["text"]
    return "\n\n".join(first.split("\n\n")[:2])


def what_loaders_give(directory: str) -> dict:
    """transformers' AutoTokenizer and megatron-core's wrapper of it on `directory`, in this interpreter."""
    import transformers
    from transformers import AutoTokenizer

    text = real_text()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ids = tokenizer.encode(text)
    result = {
        "transformers": transformers.__version__,
        "ids": ids,
        "with_end_of_text": tokenizer.encode(text + END_OF_TEXT),
        "decodes_back": tokenizer.decode(ids) == text,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "size": len(tokenizer),
        "vocab": tokenizer.get_vocab(),
    }
    from megatron.core.tokenizers import MegatronTokenizer

    megatron = MegatronTokenizer.from_pretrained(directory, metadata_path={"library": "huggingface"})
    result["megatron"] = {"ids": megatron.tokenize(text), "eod": megatron.eod, "pad": megatron.pad}
    return result


def load_each(directories) -> dict:
    results = {}
    for directory in directories:
        try:
            results[directory] = what_loaders_give(directory)
        except Exception as error:  # reported, for the test to judge
            results[directory] = {"error": f"{type(error).__name__}: {error}"}
    return results


@pytest.fixture(scope="module")
def transformers4(tmp_path_factory) -> Path:
    """A directory with transformers 4.57 and its tokenizers / hub, to put first on PYTHONPATH."""
    target = tmp_path_factory.mktemp("transformers4")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check"]
    proc = subprocess.run(
        pip + ["--retries", "2", "--target", str(target), *TRANSFORMERS_4], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        if any(marker in proc.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package index for {' '.join(TRANSFORMERS_4)}: {proc.stderr[-500:]}")
        pytest.fail(f"pip install {' '.join(TRANSFORMERS_4)} failed: {proc.stderr[-3000:]}")
    return target


def load_each_with(transformers4: Path, directories, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(transformers4), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, *map(str, directories)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def save_pretrained_as_is(source: Path, directory: Path) -> Path:
    """The tokenizer as plain transformers 5 saves it (what tokenizer directories made before the fix hold)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(directory))
    return directory


def tiny_llama_state(directory: Path, vocab_size: int):
    """A random stock Llama saved in `directory`, and it as our (state, config), as import_stock maps it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_qsparse.hf.config_mapping import config_from_stock
    from megatron_qsparse.hf.convert import read_stock_config
    from megatron_qsparse.hf.weights import hf_to_megatron, read_safetensors_dir, stock_to_hf

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    cfg = config_from_stock(read_stock_config(directory))
    return hf_to_megatron(stock_to_hf(read_safetensors_dir(directory), cfg), cfg), cfg


@pytest.fixture(scope="module")
def written(tokenizer_dir, tmp_path_factory) -> dict:
    """The directories the project writes: a trained tokenizer, and the tokenizer of an HF export and of an
    import, both made from a tokenizer saved by plain transformers 5 ("legacy": the class 4.x lacks)."""
    from megatron_qsparse.hf.convert import import_stock, save_hf_model

    root = tmp_path_factory.mktemp("written")
    legacy = save_pretrained_as_is(tokenizer_dir, root / "legacy")
    state, cfg = tiny_llama_state(root / "stock", vocab_size=2048)
    save_pretrained_as_is(legacy, root / "stock")
    imported = import_stock(root / "stock", root / "imported", log=lambda m: None)
    export = save_hf_model(state, cfg, root / "export", tokenizer=legacy, log=lambda m: None)
    return {"trained": Path(tokenizer_dir), "export": export, "import": imported / "tokenizer", "legacy": legacy}


def tokenizer_class(directory: Path) -> str:
    return json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]


def test_written_directories_name_a_class_transformers_4_knows(written):
    assert tokenizer_class(written["legacy"]) == "TokenizersBackend"  # what transformers 5 writes by itself
    for kind in ("trained", "export", "import"):
        config = json.loads((written[kind] / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", kind
        assert config["eos_token"] == config["pad_token"] == END_OF_TEXT, kind
        assert "local_files_only" not in config and "is_local" not in config, kind


def test_make_portable_renames_only_the_transformers_5_class(tmp_path, tokenizer_dir):
    from megatron_qsparse.data.tokenizer import make_portable

    legacy = save_pretrained_as_is(tokenizer_dir, tmp_path / "legacy")
    tokenizer_json = (legacy / "tokenizer.json").read_bytes()
    assert make_portable(legacy) is True
    assert tokenizer_class(legacy) == "PreTrainedTokenizerFast"
    assert (legacy / "tokenizer.json").read_bytes() == tokenizer_json
    assert make_portable(legacy) is False  # already portable: not rewritten

    llama = tmp_path / "llama"  # a model's own class (4.x has it too) is kept
    llama.mkdir()
    (llama / "tokenizer.json").write_bytes(tokenizer_json)
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert make_portable(llama) is False and tokenizer_class(llama) == "LlamaTokenizer"

    sentencepiece = tmp_path / "sentencepiece"  # no tokenizer.json: the class reads something else; kept
    sentencepiece.mkdir()
    (sentencepiece / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert make_portable(sentencepiece) is False and tokenizer_class(sentencepiece) == "TokenizersBackend"


@pytest.mark.slow
def test_transformers_4_and_5_and_megatron_core_give_the_same_ids(written, transformers4, tmp_path):
    from megatron_qsparse.data.tokenizer import load_tokenizer

    kinds = ("trained", "export", "import")
    under_4 = load_each_with(transformers4, [written[kind] for kind in (*kinds, "legacy")], cwd=tmp_path)
    under_5 = load_each([str(written[kind]) for kind in kinds])
    assert "TokenizersBackend does not exist" in under_4[str(written["legacy"])]["error"]  # the bug, reproduced

    text = real_text()
    expected = load_tokenizer(written["trained"]).tokenize(text)  # what the corpus was preprocessed with
    eod = load_tokenizer(written["trained"]).eod
    assert len(expected) > 100
    for kind in kinds:
        four, five = under_4[str(written[kind])], under_5[str(written[kind])]
        assert "error" not in four, (kind, four)
        assert four["transformers"] == "4.57.6" and five["transformers"].startswith("5.")
        for result in (four, five):
            assert result["ids"] == expected, kind
            assert result["with_end_of_text"] == expected + [eod], kind  # the special token is special
            assert result["decodes_back"], kind
            assert (result["eos"], result["pad"], result["bos"]) == (eod, eod, None), kind
            assert result["megatron"] == {"ids": expected, "eod": eod, "pad": eod}, kind
        assert four["size"] == five["size"] and four["vocab"] == five["vocab"], kind


if __name__ == "__main__":
    print(json.dumps(load_each(sys.argv[1:])))
