import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# megatron's fused ops go through torch.compile: seconds per op per process on CPU.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# The Triton kernels run in Triton's CPU interpreter here (read when a kernel module is imported): `-k triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Hermetic and offline: a private Hugging Face cache, no hub; set before `datasets` is first imported.
_HF_HOME = tempfile.mkdtemp(prefix="qsparse-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_DATASETS_CACHE=str(Path(_HF_HOME) / "datasets"),
    HF_DATASETS_OFFLINE="1",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
sys.path.insert(0, str(Path(__file__).resolve().parent))

SLICE = Path(__file__).resolve().parent / "data" / "corpus_slice.jsonl"


def pytest_sessionstart(session):
    """Build the compiled CPU ops once, before any test starts worker processes that would all wait on it."""
    from megatron_qsparse import kernels

    kernels.load()


@pytest.fixture(params=["compiled", "torch"])
def cpu_route(request, monkeypatch):
    """Run a test through the project's compiled CPU ops, then through the torch route they replace."""
    from megatron_qsparse import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "compiled_op", lambda name, x: None)
    elif kernels.backend() != "cpp":
        pytest.skip("the CPU kernels could not be built here")
    return request.param


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from megatron_qsparse.data.preprocess import preprocess
    from megatron_qsparse.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = [json.loads(line) for line in SLICE.read_text().splitlines() if line.strip()]
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    train.write_text("".join(json.dumps(d) + "\n" for i, d in enumerate(docs) if i % 8 != 3))
    valid.write_text("".join(json.dumps(d) + "\n" for i, d in enumerate(docs) if i % 8 == 3))
    tokenizer = train_bpe_tokenizer([train], root / "tokenizer", vocab_size=2048)
    for name, source in (("train", train), ("valid", valid)):
        preprocess(
            [source], root / name, tokenizer, input_format="jsonl", workers=1, log=lambda m: None, progress=False
        )
    return {
        "root": root,
        "tokenizer": str(tokenizer),
        "train": str(root / "train"),
        "valid": str(root / "valid"),
        "train_jsonl": train,
        "docs": docs,
    }


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 2000-token BPE trained on the committed slice (tokenizer and preprocessing unit tests)."""
    from megatron_qsparse.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SLICE], tmp_path_factory.mktemp("tok") / "bpe2k", vocab_size=2000)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from megatron_qsparse.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
