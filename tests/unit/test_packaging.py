"""The wheel carries the whole library: every package, the C++ kernel sources, working console scripts.

The wheel is installed with ``pip install --no-deps --target SITE`` rather than into a fresh virtualenv: a fresh
one would need torch, megatron-core and DeepSpeed installed again (gigabytes, minutes, a network). The installed
copy runs on this virtualenv's interpreter and dependencies with ``PYTHONPATH=SITE``, from a directory outside
the repository. The editable install of the repository stays visible there (its import hook sits after the normal
path search on ``sys.meta_path``, so SITE wins for whatever SITE has, and the repository fills in whatever SITE
lacks): a module missing from the wheel would silently come from the repository. So each run records, through a
``sitecustomize`` on the path, the file of every ``megatron_qsparse`` module it imported, and the test asserts
all of them lie under SITE.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_qsparse"
KERNEL_SOURCES = ["engine.cpp", "qsparse_cpu.cpp", "rows.h", "select.h", "ternary.h"]

# Imported at start-up by the interpreter of every run below; writes the file of each megatron_qsparse module
# it imported (a namespace package, which has no file, as its search path) to $QSPARSE_IMPORTS_OUT at exit.
SITECUSTOMIZE = """
import atexit, json, os, sys

def _dump():
    modules = {
        name: getattr(m, "__file__", None) or list(getattr(m, "__path__", []))
        for name, m in list(sys.modules.items())
        if name == "megatron_qsparse" or name.startswith("megatron_qsparse.")
    }
    with open(os.environ["QSPARSE_IMPORTS_OUT"], "w") as f:
        json.dump(modules, f)

atexit.register(_dump)
"""


def test_every_directory_with_python_files_is_a_package():
    """``find_packages`` skips a directory without ``__init__.py``: the wheel would lack it."""
    directories = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert PACKAGE / "training" in directories
    missing = sorted(str(d.relative_to(REPO)) for d in directories if not (d / "__init__.py").is_file())
    assert missing == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the sources (a build in the checkout would leave build/ there, and a stale
    build/lib could lend the wheel files the sources no longer have), installed under SITE."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in (
        "setup.py",
        "setup.cfg",
        "pyproject.toml",
        "MANIFEST.in",
        "requirements.txt",
        "requirements-eval.txt",
        "README.md",
    ):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "megatron_qsparse", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(root / "dist")], cwd=source, check=True
    )
    (wheel,) = (root / "dist").glob("megatron_qsparse-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"wheel": wheel, "site": site, "probe": probe}


def test_wheel_lists_the_trainer_and_the_kernel_sources(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = {
        "megatron_qsparse/training/__init__.py",
        "megatron_qsparse/training/cli.py",
        "megatron_qsparse/training/trainer.py",
        "megatron_qsparse/hf/modeling_qsparse.py",  # copied into every export as its remote code
        "megatron_qsparse/hf/configuration_qsparse.py",
        *(f"megatron_qsparse/kernels/{name}" for name in KERNEL_SOURCES),
    }
    assert expected - names == set()
    # every module of the checkout is in the wheel
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()


def run_installed(installed, cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """An installed console script from ``cwd`` with only SITE (and the import probe) on PYTHONPATH; returns the
    process with ``imports`` set to {module: file} of the megatron_qsparse modules it loaded."""
    out = cwd / f"imports-{script}.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(installed["site"]), str(installed["probe"])]),
        QSPARSE_IMPORTS_OUT=str(out),
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        [str(installed["site"] / "bin" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    proc.imports = json.loads(out.read_text())
    return proc


def assert_imported_from_site(imports: dict, site: Path, needed: str) -> None:
    assert needed in imports, sorted(imports)
    for name, where in imports.items():
        files = where if isinstance(where, list) else [where]
        assert files and all(Path(f).resolve().is_relative_to(site.resolve()) for f in files), (name, where)


@pytest.mark.slow
def test_installed_console_scripts_run_from_the_wheel(installed, corpus, tmp_path):
    site = installed["site"]
    summary = run_installed(installed, tmp_path, "qsparse-model-summary", "--preset", "tiny")
    assert summary.returncode == 0, summary.stderr
    assert "block-linear parameters N        3.162M (3,162,112)" in summary.stdout
    assert_imported_from_site(summary.imports, site, "megatron_qsparse.model.summary")

    run_dir = tmp_path / "run"
    check = run_installed(
        installed,
        tmp_path,
        "qsparse-pretrain",
        "--check",
        "--config",
        str(REPO / "pretrain_scripts" / "configs" / "tiny-cpu.yaml"),
        "--set",
        f"data.tokenizer={corpus['tokenizer']}",
        "--set",
        f"data.train=[{corpus['train']}]",
        "--set",
        f"data.valid=[{corpus['valid']}]",
        "--set",
        f"log.run_dir={run_dir}",
    )
    assert check.returncode == 0, check.stderr
    config = json.loads(check.stdout)
    assert (config["data"]["tokenizer"], config["data"]["train"]) == (corpus["tokenizer"], [corpus["train"]])
    assert config["model"]["seq_length"] == 128  # from the repository's tiny-cpu.yaml
    assert not run_dir.exists()  # --check writes nothing
    assert_imported_from_site(check.imports, site, "megatron_qsparse.training.cli")
    assert "megatron_qsparse.training.config" in check.imports


@pytest.mark.slow
def test_installed_pretrain_without_the_repository_names_the_missing_default_config(installed, tmp_path):
    """The default ``--config`` is a path relative to the repository (the configs point at its data/ too): from
    an installed wheel elsewhere it is refused in one line naming that file, exit 2."""
    proc = run_installed(installed, tmp_path, "qsparse-pretrain", "--check")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: config file pretrain_scripts/configs/tiny-cpu.yaml does not exist (see pretrain_scripts/configs/)"
    ]
    assert_imported_from_site(proc.imports, site=installed["site"], needed="megatron_qsparse.training.cli")
