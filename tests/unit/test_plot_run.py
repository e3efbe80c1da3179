"""tools/plot_run.py: PNGs of a run's metrics.jsonl, each figure drawing exactly the recorded numbers; one-line
errors for a missing or empty metrics file; `make pretrain`'s summary lists the plots."""

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import pytest

from megatron_qsparse.training.plots import figure_series, read_metrics

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["loss", "learning_rate", "grad_norm", "sparsity", "tokens_per_s", "layer_sparsity", "layer_grad_norm"]
SITES = ["qkv", "proj", "fc1", "fc2"]


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plot_run():
    return load_script(REPO / "tools" / "plot_run.py", "tool_plot_run")


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A real 6-step run of the test model, evaluating (and recording per-layer values) at steps 3 and 6."""
    from training.conftest import run_training, write_config

    root = tmp_path_factory.mktemp("plotted")
    config = write_config(root / "config.yaml", corpus, root / "run", train={"steps": 6}, log={"eval_interval": 3})
    proc = run_training(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def record(step: int, loss: float, **extra) -> dict:
    base = {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 0.5 + step,
        "tokens_per_s": 100.0 * step,
        "sparsity": {s: 0.5 for s in SITES},
    }
    return {**base, **extra}


def write_metrics(run_dir: Path, records, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


@pytest.mark.slow  # the real training run behind it takes 20-40 s on a shared 2-core machine
def test_plots_of_a_real_run(trained_run, plot_run, capsys):
    assert plot_run.main([str(trained_run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["plots"]
    assert listed == [str(trained_run / "plots" / f"{name}.png") for name in FIGURES]
    for path in map(Path, listed):
        assert png_size(path) == (880, 528)  # 8 x 4.8 inches at 110 dpi
        assert path.stat().st_size > 10_000  # axes, labels and lines, not an empty canvas
    assert sorted(p.name for p in (trained_run / "plots").iterdir()) == sorted(f"{n}.png" for n in FIGURES)

    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    series = figure_series(read_metrics(trained_run))
    steps = [m["step"] for m in metrics]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert series["loss"]["train"] == {"steps": steps, "values": [m["loss"] for m in metrics]}
    assert series["loss"]["heldout"] == {"steps": [3, 6], "values": [metrics[i]["eval"]["loss"] for i in (2, 5)]}
    assert series["learning_rate"]["values"] == [m["lr"] for m in metrics]
    assert series["grad_norm"]["values"] == [m["grad_norm"] for m in metrics]
    assert series["tokens_per_s"]["values"] == [m["tokens_per_s"] for m in metrics]
    assert list(series["sparsity"]) == SITES
    for site in SITES:
        assert series["sparsity"][site]["values"] == [m["sparsity"][site] for m in metrics]
    layers = metrics[5]["layers"]
    heat = series["layer_sparsity"]
    assert heat["step"] == 6 and heat["sites"] == SITES
    assert heat["values"] == [[layers["sparsity"][s][i] for s in SITES] for i in range(2)]  # (2 layers, 4 sites)
    assert heat["values"][0][3] > 0.79  # fc2's configured 80% (ReLU² zeros only add), qkv's 50%
    assert heat["values"][1][0] == pytest.approx(0.5)
    grads = series["layer_grad_norm"]
    assert grads["steps"] == [3, 6]
    assert grads["values"] == [[metrics[i]["layers"]["grad_norm"][layer] for i in (2, 5)] for layer in range(2)]


@pytest.mark.slow  # shares the real run above
def test_make_pretrain_summary_draws_and_lists_the_plots(trained_run, capsys):
    default_run = load_script(REPO / "pretrain_scripts" / "default_run.py", "default_run_for_plots")
    paths = default_run.draw_plots(trained_run)
    out = capsys.readouterr().out
    assert [p.name for p in paths] == [f"{n}.png" for n in FIGURES]
    assert f"plots              {trained_run / 'plots'}/" in out
    assert all(str(p) in out and p.is_file() for p in paths)


def test_make_pretrain_summary_names_plots_it_could_not_draw(tmp_path, capsys):
    default_run = load_script(REPO / "pretrain_scripts" / "default_run.py", "default_run_for_plots")
    (tmp_path / "run").mkdir()
    assert default_run.draw_plots(tmp_path / "run") == []
    out = capsys.readouterr().out
    assert "plots              not written: " in out and "metrics.jsonl: no such file or directory" in out


def test_skipped_steps_are_marked_not_plotted_and_a_partial_line_is_left_out(tmp_path, plot_run, capsys):
    records = [record(1, 7.0), {"step": 2, "loss": math.nan, "skipped": True}, record(3, 6.5)]
    run = write_metrics(tmp_path / "run", records, tail='{"step": 4, "lo')  # a trainer still writing step 4
    series = figure_series(read_metrics(run))
    assert series["loss"]["train"] == {"steps": [1, 3], "values": [7.0, 6.5]}
    assert series["loss"]["skipped"] == [2]
    assert series["grad_norm"]["steps"] == [1, 3] and series["sparsity"]["fc2"]["steps"] == [1, 3]
    assert series["loss"]["heldout"] == {"steps": [], "values": []}
    assert "layer_sparsity" not in series and "layer_grad_norm" not in series  # no evaluation yet

    assert plot_run.main([str(run), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / f"{n}.png") for n in FIGURES[:5]]
    assert all(png_size(Path(p)) == (880, 528) for p in printed)


def test_layer_values_come_from_the_last_record_that_has_them(tmp_path):
    first = {"sparsity": {s: [0.1, 0.2, 0.3] for s in SITES}, "grad_norm": [1.0, 2.0, 3.0]}
    last = {"sparsity": {s: [0.5 + 0.1 * i, 0.6, 0.7] for i, s in enumerate(SITES)}}  # the final step: no grads
    run = write_metrics(tmp_path / "run", [record(1, 7.0, layers=first), record(2, 6.0, layers=last)])
    series = figure_series(read_metrics(run))
    assert series["layer_sparsity"]["step"] == 2
    assert series["layer_sparsity"]["values"] == [[0.5, 0.6, 0.7, 0.8], [0.6] * 4, [0.7] * 4]  # 3 layers x 4 sites
    assert series["layer_grad_norm"] == {"steps": [1], "values": [[1.0], [2.0], [3.0]]}


@pytest.mark.parametrize(
    "setup, code, message",
    [
        (lambda d: None, 66, "run: no such file or directory"),
        (lambda d: d.mkdir(), 66, "metrics.jsonl: no such file or directory"),
        (lambda d: write_metrics(d, []), 65, "metrics.jsonl: no records yet"),
        (lambda d: write_metrics(d, [], tail="not json\n{}\n"), 65, "metrics.jsonl:1: not a JSON record"),
    ],
    ids=["no-run-dir", "no-metrics", "empty-metrics", "not-json"],
)
def test_errors_are_one_line_with_their_exit_code(tmp_path, plot_run, capsys, setup, code, message):
    setup(tmp_path / "run")
    assert plot_run.main([str(tmp_path / "run")]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("plot_run.py: error: ") and message in err, err
    assert not (tmp_path / "run" / "plots").exists()


def test_the_tool_runs_as_a_command(tmp_path):
    import subprocess

    run = write_metrics(tmp_path / "run", [record(1, 7.0), record(2, 6.0)])
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), str(run)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(run / "plots" / f"{n}.png") for n in FIGURES[:5]]
