"""The conversion, evaluation and sweep tools report a missing input, an output they cannot create or a full disk
in one line on stderr naming the path, with the exit code of megatron_qsparse/errors.py, and no traceback.

Tests run as root, where permissions deny nothing: a read-only location is /sys (sysfs refuses new entries to
everyone), and a full disk or read-only file system in the middle of a write is raised in-process at the write."""

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_qsparse.errors import EXIT_CANT_CREATE, EXIT_DATA, EXIT_IO, EXIT_NO_INPUT

REPO = Path(__file__).resolve().parents[2]
READ_ONLY = Path("/sys/qsparse-test-output")  # mkdir there: EPERM (EROFS or EACCES elsewhere): exit 73 all


def tool(name: str):
    """tools/NAME.py as a module (a private name: tools/evaluate.py must not shadow a package `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"qsparse_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def one_line(stderr: str, name: str, *fragments) -> str:
    """The whole of stderr: one ``NAME.py: error: ...`` line holding every fragment (no traceback, no warning)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{name}.py: error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def fake_checkpoint(directory: Path) -> Path:
    """A checkpoint in name only: the tools check their outputs before verifying and loading one."""
    (directory / "model").mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {"model": {"preset": "tiny"}}}))
    return directory


# ---- as users run them: the whole stderr --------------------------------------------------------------------
@pytest.mark.slow  # importing megatron-core and transformers in a fresh process: 10-20 s
def test_convert_to_hf_read_only_output_is_one_line(tmp_path):
    proc = run_tool("convert_to_hf", "--checkpoint", fake_checkpoint(tmp_path / "ckpt"), "--output", READ_ONLY)
    assert proc.returncode == EXIT_CANT_CREATE, proc.stderr
    one_line(proc.stderr, "convert_to_hf", f"{READ_ONLY}: ")
    assert not READ_ONLY.exists()


def test_evaluate_missing_export_is_one_line(tmp_path):
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": "some held-out words"}) + "\n")
    proc = run_tool("evaluate", "--model", tmp_path / "export", "--data", data)
    assert proc.returncode == EXIT_NO_INPUT
    one_line(proc.stderr, "evaluate", f"{tmp_path / 'export' / 'config.json'}: no such file or directory")


def write_sweep(path: Path, output) -> Path:
    grid = {"train.seed": [1, 2]}
    path.write_text(
        yaml.safe_dump({"base": "pretrain_scripts/configs/tiny-cpu.yaml", "output": str(output), "grid": grid})
    )
    return path


def test_sweep_unwritable_output_directory_is_one_line_before_any_run(tmp_path):
    proc = run_tool("sweep", write_sweep(tmp_path / "sweep.yaml", READ_ONLY / "sweep"))
    assert proc.returncode == EXIT_CANT_CREATE, proc.stderr
    one_line(proc.stderr, "sweep", f"{READ_ONLY / 'sweep'}: ")
    assert proc.stdout == ""  # refused before the banner: no run started


def test_fit_scaling_law_missing_csv_is_one_line(tmp_path):
    proc = run_tool("fit_scaling_law", tmp_path / "results.csv")
    assert proc.returncode == EXIT_NO_INPUT
    one_line(proc.stderr, "fit_scaling_law", f"{tmp_path / 'results.csv'}: no such file", "tools/sweep.py")


# ---- in-process: each kind of failure -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert_to_hf():
    return tool("convert_to_hf")


def test_convert_to_hf_missing_checkpoint(convert_to_hf, tmp_path, capsys):
    code = convert_to_hf.main(["--checkpoint", str(tmp_path / "runs"), "--output", str(tmp_path / "hf")])
    assert code == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "convert_to_hf", f"{tmp_path / 'runs'}: no such file or directory")
    (tmp_path / "runs").mkdir()  # there, but training never completed a checkpoint: bad data
    assert convert_to_hf.main(["--checkpoint", str(tmp_path / "runs"), "--output", str(tmp_path / "hf")]) == EXIT_DATA
    one_line(capsys.readouterr().err, "convert_to_hf", f"{tmp_path / 'runs'}: no complete checkpoint")
    assert not (tmp_path / "hf").exists()


def test_convert_to_hf_existing_or_blocked_output(convert_to_hf, tmp_path, capsys):
    checkpoint = str(fake_checkpoint(tmp_path / "ckpt"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert convert_to_hf.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "hf")]) == EXIT_CANT_CREATE
    one_line(capsys.readouterr().err, "convert_to_hf", f"{tmp_path / 'hf'} exists and is not empty")
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"

    (tmp_path / "file").write_text("x")  # an output path under a regular file: ENOTDIR, the file named
    assert convert_to_hf.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "file" / "hf")]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "convert_to_hf", f"{tmp_path / 'file'}: not a directory")


@pytest.mark.parametrize(
    "failure,code,what",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), EXIT_IO, "no space left on device"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS)), EXIT_CANT_CREATE, "read-only file system"),
        # safetensors reports a full disk without an errno (its message, shortened: the kind is what tells)
        (
            RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No spa.." })'),
            EXIT_IO,
            "no space left on device",
        ),
    ],
)
def test_convert_to_hf_failure_while_writing_names_the_output(
    convert_to_hf, tmp_path, capsys, monkeypatch, failure, code, what
):
    from megatron_qsparse.hf import convert
    from megatron_qsparse.model import preset

    output = tmp_path / "hf"
    monkeypatch.setattr(convert, "load_megatron_state", lambda path: ({}, preset("tiny"), {"config": {}}))

    def fail_at_the_write(state, cfg):
        staging = next(tmp_path.glob(".hf.tmp-*"))  # the hidden sibling the export is written in
        if isinstance(failure, OSError):
            failure.filename = str(staging / "model.safetensors")
        raise failure

    monkeypatch.setattr(convert, "megatron_to_hf", fail_at_the_write)
    argv = ["--checkpoint", str(fake_checkpoint(tmp_path / "ckpt")), "--output", str(output)]
    assert convert_to_hf.main(argv) == code
    line = one_line(capsys.readouterr().err, "convert_to_hf", f"error: {output}: {what}")
    assert ".hf.tmp-" not in line
    assert not output.exists() and not list(tmp_path.glob(".hf.*"))  # nothing half-written is left


def test_convert_from_hf_inputs_and_output(tmp_path, capsys):
    convert_from_hf = tool("convert_from_hf")
    args = ["--output", str(tmp_path / "out")]
    assert convert_from_hf.main(["--hf", str(tmp_path / "stock"), *args]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "convert_from_hf", f"{tmp_path / 'stock'}: no such file or directory")
    (tmp_path / "stock").mkdir()
    assert convert_from_hf.main(["--hf", str(tmp_path / "stock"), *args]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "convert_from_hf", f"{tmp_path / 'stock' / 'config.json'}: no such file")
    (tmp_path / "stock" / "config.json").write_text("{not json")
    assert convert_from_hf.main(["--hf", str(tmp_path / "stock"), *args]) == EXIT_DATA
    one_line(capsys.readouterr().err, "convert_from_hf", f"{tmp_path / 'stock' / 'config.json'}: not a Hugging Face")
    (tmp_path / "stock" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert convert_from_hf.main(["--hf", str(tmp_path / "stock"), *args]) == EXIT_DATA
    one_line(capsys.readouterr().err, "convert_from_hf", "config.json: no 'num_attention_heads' key")


def test_generate_missing_export(tmp_path, capsys):
    generate = tool("generate")
    assert generate.main(["--model", str(tmp_path / "export"), "--prompt-ids", "1,2"]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "generate", f"{tmp_path / 'export' / 'config.json'}: no such file or directory")


def test_gradient_norms_missing_inputs_and_unwritable_csv(tmp_path, capsys):
    gradient_norms = tool("gradient_norms")
    checkpoint, data = str(fake_checkpoint(tmp_path / "ckpt")), str(tmp_path / "heldout")
    assert gradient_norms.main([checkpoint, str(tmp_path / "nowhere"), "--data", data]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "gradient_norms", f"{tmp_path / 'nowhere'}: no such file or directory")
    assert gradient_norms.main([checkpoint, "--data", data, "--csv", str(READ_ONLY / "n.csv")]) == EXIT_CANT_CREATE
    one_line(capsys.readouterr().err, "gradient_norms", f"{READ_ONLY / 'n.csv'}: ")
    assert gradient_norms.main([checkpoint, "--data", data, "--csv", str(tmp_path / "n.csv")]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "gradient_norms", f"{tmp_path / 'heldout.idx'}: no such file or directory")
    assert not (tmp_path / "n.csv").exists()


def test_sweep_missing_file_and_output_under_a_file(tmp_path, capsys):
    sweep = tool("sweep")
    assert sweep.main([str(tmp_path / "sweep.yaml")]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "sweep", f"{tmp_path / 'sweep.yaml'}: no such file or directory")
    (tmp_path / "file").write_text("x")
    assert sweep.main([str(write_sweep(tmp_path / "sweep.yaml", tmp_path / "file" / "out"))]) == EXIT_NO_INPUT
    one_line(capsys.readouterr().err, "sweep", f"{tmp_path / 'file' / 'out'}: not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_fit_scaling_law_unwritable_plot_directory(tmp_path, capsys):
    fit_scaling_law = tool("fit_scaling_law")
    rows = [(n, s, 3.0 + s - n / 1e7, "false") for n in (1e6, 2e6) for s in (0.0, 0.3, 0.6)]
    (tmp_path / "results.csv").write_text("N,S,loss,bitnet\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    argv = [str(tmp_path / "results.csv"), "--plot", str(READ_ONLY / "plots"), "--bootstrap", "0"]
    assert fit_scaling_law.main(argv) == EXIT_CANT_CREATE
    one_line(capsys.readouterr().err, "fit_scaling_law", f"{READ_ONLY / 'plots'}: ")
