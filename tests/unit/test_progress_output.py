"""Progress where a user waits, as it reads in a log (stderr not a terminal: a line per 5% with the total): the
Hugging Face import and export (tensors converted), a sweep (runs done, with an ETA), the corpus build (package
bytes, documents written)."""

import importlib.util
import json
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<desc>.+?): (?P<percent>\d+)% (?P<n>[\d,.]+)/(?P<total>[\d,.]+) (?P<unit>\w+), ")


def progress_lines(text: str, desc: str) -> list:
    """(percent, n, total, unit, line) of each progress line of ``desc``."""
    found = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match and match["desc"] == desc:
            n, total = (float(match[k].replace(",", "")) for k in ("n", "total"))
            found.append((int(match["percent"]), n, total, match["unit"], line))
    return found


def assert_counts_to_total(lines: list, total: float, unit: str) -> None:
    assert lines, "no progress line"
    assert all(t == total and u == unit for _, _, t, u, _ in lines), lines
    assert [p for p, *_ in lines] == sorted(p for p, *_ in lines)  # percent only goes up
    for percent, n, *_ in lines:
        assert percent == round(100 * n / total)
    assert lines[-1][0] == 100 and ", done" in lines[-1][-1]


# ---- Hugging Face conversion --------------------------------------------------------------------------------------
def tiny_llama(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


TENSORS = 2 * 6 + 3  # 2 layers x (2 norms, qkv, proj, fc1, fc2) + embedding, final norm, output layer


def test_export_reports_tensors_converted_of_the_total(tmp_path, capsys):
    from megatron_qsparse.hf.config_mapping import config_from_stock
    from megatron_qsparse.hf.convert import save_hf_model
    from megatron_qsparse.hf.weights import hf_to_megatron, read_safetensors_dir, stock_to_hf

    tiny_llama(tmp_path / "llama")
    cfg = config_from_stock(json.loads((tmp_path / "llama" / "config.json").read_text()), "config.json")
    state = hf_to_megatron(stock_to_hf(read_safetensors_dir(tmp_path / "llama"), cfg), cfg)  # our layout, in memory
    save_hf_model(state, cfg, tmp_path / "exported", stock_format=True, log=lambda m: None)
    lines = progress_lines(capsys.readouterr().err, "export: converting tensors")
    assert_counts_to_total(lines, TENSORS, "tensor")
    assert [n for _, n, *_ in lines] == [*range(1, TENSORS + 1), TENSORS]  # a line a tensor (each > 5%), the end
    assert "ETA" in lines[0][-1]


@pytest.mark.slow  # builds, saves and reloads a megatron checkpoint: 15-30 s on a shared 2-core machine
def test_import_and_export_report_tensors_converted_of_the_total(tmp_path, capsys):
    from megatron_qsparse.hf.convert import export_checkpoint, import_stock

    tiny_llama(tmp_path / "llama")
    imported = import_stock(tmp_path / "llama", tmp_path / "imported", log=lambda m: None)
    export_checkpoint(imported, tmp_path / "exported", stock_format=True, log=lambda m: None)
    err = capsys.readouterr().err
    for desc in ("import: converting tensors", "export: converting tensors"):
        lines = progress_lines(err, desc)
        assert_counts_to_total(lines, TENSORS, "tensor")
        assert len(lines) == TENSORS + 1  # each tensor is over 5% of 15: a line each, then the closing one


# ---- sweep --------------------------------------------------------------------------------------------------------
FAKE_TRAINER = """
import json, sys, time
run_dir = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("log.run_dir=")][0]
time.sleep(0.2)
record = {"step": 1, "loss": 5.0, "activated_params": 100.0, "eval": {"loss": 4.5, "bits_per_byte": 2.0}}
open(run_dir + "/metrics.jsonl", "w").write(json.dumps(record) + "\\n")
"""


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"progress_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_reports_runs_done_of_the_total_with_an_eta(tmp_path, capsys, monkeypatch):
    sweep_tool = load_tool("sweep")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        json.dumps(
            {
                "base": str(REPO / "pretrain_scripts" / "configs" / "tiny-cpu.yaml"),
                "output": str(tmp_path / "out"),
                "grid": {"train.seed": [1, 2, 3, 4]},
            }
        )
    )
    # The trainer is a stand-in that writes a one-step metrics.jsonl: the sweep's bookkeeping is what is tested.
    monkeypatch.setattr(
        sweep_tool, "command", lambda sweep, overrides: [sys.executable, "-c", FAKE_TRAINER, *overrides]
    )
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    sweep = sweep_tool.load_sweep(sweep_file)
    assert sweep_tool.Runner(sweep, 1).run(list(range(4))) == 0
    lines = progress_lines(capsys.readouterr().err, "sweep")
    assert_counts_to_total(lines, 4, "run")
    assert [n for _, n, *_ in lines] == [1, 2, 3, 4, 4]  # a line per run finished, then the closing one
    assert all(re.search(r"ETA \d+s$", line) for *_, line in lines[:3])  # the remaining runs at the pace so far


# ---- corpus ------------------------------------------------------------------------------------------------------
def test_corpus_build_reports_package_bytes_and_documents(tmp_path, capsys, monkeypatch):
    from megatron_qsparse.data.corpus import fetch, store
    from megatron_qsparse.data.corpus.documents import Document

    sizes = {"pkg-a": 3000, "pkg-b": 1000}

    def download(package, dest, log):
        deb = dest / f"{package}_1.0_all.deb"
        deb.write_bytes(b"x" * sizes[package])
        return deb

    monkeypatch.setattr(fetch, "package_size", sizes.get)
    monkeypatch.setattr(fetch, "download_debian_package", download)
    monkeypatch.setattr(fetch, "unpack_deb", lambda deb, dest: dest)
    monkeypatch.setattr(
        fetch,
        "SOURCES",
        tuple(
            fetch._Source(name, name, lambda root, name=name: [Document(f"{name}/{i}", "text " * 5) for i in range(60)])
            for name in sizes
        ),
    )
    documents, versions = fetch.build_documents(tmp_path, log=lambda m: None)
    assert versions == {"pkg-a": "1.0", "pkg-b": "1.0"}
    files = store.write_corpus(tmp_path / "corpus", documents, versions, log=lambda m: None)
    err = capsys.readouterr().err
    packages = progress_lines(err, "corpus packages")
    assert_counts_to_total(packages, 4000, "B")
    assert [n for _, n, *_ in packages] == [3000, 4000, 4000]  # pkg-a's 3000 bytes, then pkg-b's 1000
    assert "60 documents" in packages[0][-1] and "120 documents" in packages[1][-1]
    written = progress_lines(err, "writing the corpus")
    assert_counts_to_total(written, 120, "doc")
    assert files.train_counts.documents + files.heldout_counts.documents == 120
    assert len(written) == 21  # 5%, 10%, ..., 100%, then the closing line


def test_corpus_progress_counts_packages_when_sizes_are_unknown(tmp_path, capsys, monkeypatch):
    from megatron_qsparse.data.corpus import fetch
    from megatron_qsparse.data.corpus.documents import Document

    monkeypatch.setattr(fetch, "package_size", lambda package: None)
    monkeypatch.setattr(fetch, "download_debian_package", lambda p, dest, log: dest / f"{p}_2.0_all.deb")
    monkeypatch.setattr(fetch, "unpack_deb", lambda deb, dest: dest)
    sources = tuple(fetch._Source(n, n, lambda root: [Document("a/1", "text")]) for n in ("p1", "p2", "p3"))
    monkeypatch.setattr(fetch, "SOURCES", sources)
    fetch.build_documents(tmp_path, log=lambda m: None)
    lines = progress_lines(capsys.readouterr().err, "corpus packages")
    assert_counts_to_total(lines, 3, "package")


def test_a_failed_corpus_build_does_not_say_done(tmp_path, capsys, monkeypatch):
    from megatron_qsparse.data.corpus import fetch
    from megatron_qsparse.data.corpus.documents import CorpusError, Document

    def download(package, dest, log):
        if package == "p2":
            raise CorpusError("apt-get download p2 failed")
        return dest / f"{package}_1_all.deb"

    monkeypatch.setattr(fetch, "package_size", lambda package: None)
    monkeypatch.setattr(fetch, "download_debian_package", download)
    monkeypatch.setattr(fetch, "unpack_deb", lambda deb, dest: dest)
    sources = tuple(fetch._Source(n, n, lambda root: [Document("a/1", "text")]) for n in ("p1", "p2", "p3"))
    monkeypatch.setattr(fetch, "SOURCES", sources)
    with pytest.raises(CorpusError):
        fetch.build_documents(tmp_path, log=lambda m: None)
    lines = progress_lines(capsys.readouterr().err, "corpus packages")
    assert [n for _, n, *_ in lines] == [1]  # p1 fetched; no closing line claiming the build is done
    assert not any(", done" in line for *_, line in lines)


@pytest.mark.parametrize("output", ["Size: 654244\n", "N: Unable to locate package\n"])
def test_package_size_reads_apt_cache(output, monkeypatch):
    import subprocess

    from megatron_qsparse.data.corpus import debian

    def fake_run(command, **kwargs):
        assert command == ["apt-cache", "show", "--no-all-versions", "jargon-text"]
        return subprocess.CompletedProcess(command, 0, stdout=f"Package: jargon-text\n{output}", stderr="")

    monkeypatch.setattr(debian.subprocess, "run", fake_run)
    assert debian.package_size("jargon-text") == (654244 if output.startswith("Size") else None)
