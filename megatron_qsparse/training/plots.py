"""Plots of a run from its ``metrics.jsonl`` (what ``telemetry.MetricsWriter`` writes, one JSON object per step):
training and held-out loss, learning rate, gradient norm, realized sparsity per site, a layer × site heat map of
realized sparsity, per-layer gradient norms at the evaluation steps, and throughput.

``figure_series(records)`` returns the numbers each figure draws (tests compare them with the metrics);
``write_plots(run_dir)`` draws them with matplotlib's Agg backend and writes each PNG atomically.
"""

import errno
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from megatron_qsparse.atomic import atomic_file
from megatron_qsparse.errors import DataError, os_error

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
FIGURE_SIZE = (8.0, 4.8)
DPI = 110
ANNOTATE_CELLS_UP_TO = 160
MAX_TICKS = 24  # a heat map with more cells than this gets no value printed in each cell


# ---- the data ---------------------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> List[dict]:
    """The records of ``run_dir/metrics.jsonl``. A missing directory or file is a missing input (exit 66), a file
    without records or with a line that is not JSON is bad data (exit 65). A last line without its newline is a
    record still being written by a running trainer: it is left out."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise os_error(errno.ENOENT if not run_dir.exists() else errno.ENOTDIR, run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise os_error(errno.ENOENT, path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: a partial write
                continue
            raise DataError(f"{path}:{number}: not a JSON record ({err.msg}); is this a run's metrics file?") from None
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path}:{number}: a record without a step; is this a run's metrics file?")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records yet; plot the run after its first step")
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _series(records: List[dict], key: str) -> dict:
    """{"steps": [...], "values": [...]} of the trained steps that report a finite ``key``."""
    chosen = [r for r in records if not r.get("skipped") and _finite(r.get(key))]
    return {"steps": [r["step"] for r in chosen], "values": [r[key] for r in chosen]}


def _heldout(records: List[dict], key: str) -> dict:
    chosen = [r for r in records if isinstance(r.get("eval"), dict) and _finite(r["eval"].get(key))]
    return {"steps": [r["step"] for r in chosen], "values": [r["eval"][key] for r in chosen]}


def _site_series(records: List[dict]) -> Dict[str, dict]:
    sites: Dict[str, dict] = {}
    for r in records:
        if r.get("skipped") or not isinstance(r.get("sparsity"), dict):
            continue
        for site, value in r["sparsity"].items():
            entry = sites.setdefault(site, {"steps": [], "values": []})
            entry["steps"].append(r["step"])
            entry["values"].append(value)
    return sites


def _layer_sparsity(records: List[dict]) -> Optional[dict]:
    """The last per-layer sparsity: values[layer][site] (rows are layers, columns sites)."""
    last = next((r for r in reversed(records) if isinstance(r.get("layers", {}).get("sparsity"), dict)), None)
    if last is None:
        return None
    by_site = last["layers"]["sparsity"]
    sites = list(by_site)
    layers = len(by_site[sites[0]]) if sites else 0
    return {"step": last["step"], "sites": sites, "values": [[by_site[s][i] for s in sites] for i in range(layers)]}


def _layer_grad_norms(records: List[dict]) -> Optional[dict]:
    """Per-layer gradient norms at every step that measured them: values[layer][k] for steps[k]."""
    chosen = [r for r in records if isinstance(r.get("layers", {}).get("grad_norm"), list)]
    if not chosen:
        return None
    layers = len(chosen[-1]["layers"]["grad_norm"])
    chosen = [r for r in chosen if len(r["layers"]["grad_norm"]) == layers]
    return {
        "steps": [r["step"] for r in chosen],
        "values": [[r["layers"]["grad_norm"][i] for r in chosen] for i in range(layers)],
    }


def figure_series(records: List[dict]) -> Dict[str, dict]:
    """What each figure plots, by figure name (the PNG's name without ``.png``); a figure whose data the run did
    not record (no evaluation step yet: no per-layer values) is absent."""
    series = {
        "loss": {
            "train": _series(records, "loss"),
            "heldout": _heldout(records, "loss"),
            "skipped": [r["step"] for r in records if r.get("skipped")],
        },
        "learning_rate": _series(records, "lr"),
        "grad_norm": _series(records, "grad_norm"),
        "sparsity": _site_series(records),
        "tokens_per_s": _series(records, "tokens_per_s"),
    }
    layer_sparsity = _layer_sparsity(records)
    if layer_sparsity is not None:
        series["layer_sparsity"] = layer_sparsity
    layer_grads = _layer_grad_norms(records)
    if layer_grads is not None:
        series["layer_grad_norm"] = layer_grads
    return series


# ---- the figures ------------------------------------------------------------------------------------------------
def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on its own Agg canvas: no pyplot state, no display needed, safe in any thread.
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _line_figure(title: str, ylabel: str, lines: Dict[str, dict], log_y: bool = False, ylim=None):
    figure = _figure()
    axes = figure.add_subplot()
    for label, data in lines.items():
        axes.plot(data["steps"], data["values"], marker="o" if len(data["steps"]) < 30 else None, ms=3, label=label)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    if log_y and all(v > 0 for d in lines.values() for v in d["values"]):
        axes.set_yscale("log")
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(alpha=0.3)
    if len(lines) > 1:
        axes.legend()
    return figure


def _loss_figure(data: dict, run_name: str):
    lines = {"training loss": data["train"]}
    if data["heldout"]["steps"]:
        lines["held-out loss"] = data["heldout"]
    figure = _line_figure(f"{run_name}: loss", "cross-entropy loss (nats per token)", lines)
    axes = figure.axes[0]
    for i, step in enumerate(data["skipped"]):
        axes.axvline(step, color="red", alpha=0.4, lw=1, label="skipped step (non-finite loss)" if i == 0 else None)
    if data["skipped"]:
        axes.legend()
    return figure


def _heat_map(title: str, values: List[List[float]], columns: List[str], xlabel: str, colorbar: str, **limits):
    figure = _figure()
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", **limits)
    rows = len(values)
    axes.set(title=title, xlabel=xlabel, ylabel="layer")
    every = max(1, len(columns) // MAX_TICKS)  # many evaluation steps: label every few columns
    axes.set_xticks(range(0, len(columns), every), columns[::every])
    axes.set_yticks(range(0, rows, max(1, rows // MAX_TICKS)))
    if rows * len(columns) <= ANNOTATE_CELLS_UP_TO:
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                color = "black" if image.norm(value) > 0.6 else "white"  # dark text on the light (yellow) end
                axes.text(j, i, f"{value:.3g}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axes, label=colorbar)
    return figure


def _figures(series: Dict[str, dict], run_name: str) -> Dict[str, object]:
    figures = {
        "loss": _loss_figure(series["loss"], run_name),
        "learning_rate": _line_figure(f"{run_name}: learning rate", "learning rate", {"lr": series["learning_rate"]}),
        "grad_norm": _line_figure(
            f"{run_name}: gradient norm", "global L2 norm of the gradient", {"grad": series["grad_norm"]}, True
        ),
        "sparsity": _line_figure(
            f"{run_name}: realized sparsity per site (mean over layers)",
            "fraction of zero inputs",
            series["sparsity"],
            ylim=(0.0, 1.02),
        ),
        "tokens_per_s": _line_figure(
            f"{run_name}: throughput", "tokens per second", {"tokens/s": series["tokens_per_s"]}
        ),
    }
    if "layer_sparsity" in series:
        data = series["layer_sparsity"]
        figures["layer_sparsity"] = _heat_map(
            f"{run_name}: realized sparsity by layer and site (step {data['step']})",
            data["values"],
            data["sites"],
            "site (input of the projection)",
            "fraction of zero inputs",
            vmin=0.0,
            vmax=1.0,
        )
    if "layer_grad_norm" in series:
        data = series["layer_grad_norm"]
        figures["layer_grad_norm"] = _heat_map(
            f"{run_name}: gradient norm by layer",
            data["values"],
            [str(s) for s in data["steps"]],
            "step",
            "L2 norm of the layer's gradient",
        )
    return figures


def write_plots(run_dir: Path, output: Optional[Path] = None) -> List[Path]:
    """Draws the run's figures into ``output`` (default ``run_dir/plots``), each PNG written atomically; returns
    the paths written, in a fixed order."""
    run_dir = Path(run_dir)
    series = figure_series(read_metrics(run_dir))
    output = Path(output) if output is not None else run_dir / PLOTS_DIR
    written = []
    for name, figure in _figures(series, run_dir.resolve().name).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        path = output / f"{name}.png"
        with atomic_file(path, "wb") as stream:
            stream.write(buffer.getvalue())
        written.append(path)
    return written
