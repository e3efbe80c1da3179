"""The tables of docs/results/README.md, generated from the CSVs and fits committed beside it.

    .venv/bin/python tools/results_report.py --collect   # copy the sweeps' results.csv, fit, measure gradients, plot
    .venv/bin/python tools/results_report.py --write     # rewrite the generated tables in the report
    .venv/bin/python tools/results_report.py --check     # exit 1 if the report's tables differ from the CSVs

The report marks each generated table with ``<!-- table:NAME -->`` ... ``<!-- end -->``; the prose around them is
written by hand. ``--collect`` needs the sweeps of pretrain_scripts/sweeps/ to have run (tools/sweep.py); it is
the slow step (the scaling-law fits with bootstrap intervals, the gradient measurement). ``--write`` and
``--check`` only read docs/results/.
"""

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
REPORT = RESULTS / "README.md"
SWEEPS = ("scaling", "scaling-seed2", "bitnet", "variants", "continue")
SCALING = ("scaling.csv", "scaling-seed2.csv")  # the grid, once per seed
STE_RUNS = ("dense", "topk50-ste", "topk50-no-ste")
STE_STEPS = ("step_0000020", "step_0000100")  # early in training, and at its end
HELDOUT = "data/corpus_heldout_text_document"
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- end -->)", re.S)


def read_csv(name: str) -> list:
    with open(RESULTS / name, newline="") as stream:
        return list(csv.DictReader(stream))


def by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def size_order(rows):
    return sorted({r["axis:size"] for r in rows}, key=lambda s: int(s[1:]))


def scaling_rows() -> list:
    """The scaling grid's rows of every seed that has run."""
    return [row for name in SCALING if (RESULTS / name).exists() for row in read_csv(name)]


def seed_losses(rows) -> dict:
    """(size, sparsity) -> held-out losses over the seeds."""
    out = {}
    for r in rows:
        out.setdefault((r["axis:size"], r["axis:model.sparsity.default"]), []).append(float(r["loss"]))
    return out


def mean_and_spread(losses) -> str:
    mean = statistics.mean(losses)
    return f"{mean:.4f} ± {(max(losses) - min(losses)) / 2:.4f}" if len(losses) > 1 else f"{mean:.4f}"


def scaling_table() -> str:
    rows = scaling_rows()
    sparsities = sorted({r["axis:model.sparsity.default"] for r in rows}, key=float)
    losses = seed_losses(rows)
    body = []
    for size in size_order(rows):
        any_row = next(r for r in rows if r["axis:size"] == size)
        line = [size, f"{int(any_row['N']) / 1e6:.2f}M"]
        line += [mean_and_spread(losses[(size, s)]) if (size, s) in losses else "–" for s in sparsities]
        body.append(line)
    seeds = len({r["seed"] for r in rows})
    return table(["size", "N"] + [f"S = {s}" for s in sparsities], body) + f"\n(mean ± half range over {seeds} seeds)\n"


def gap_table() -> str:
    rows = scaling_rows()
    losses = {key: statistics.mean(v) for key, v in seed_losses(rows).items()}
    body = []
    for size in size_order(rows):
        dense = losses[(size, "0.0")]
        line = [size, f"{dense:.4f}"]
        for s in ("0.4", "0.5", "0.6", "0.8"):
            gap = losses[(size, s)] - dense if (size, s) in losses else None
            line.append("–" if gap is None else f"{gap:+.4f} ({gap / dense:+.2%})")
        body.append(line)
    return table(["size", "dense loss", "40% − dense", "50% − dense", "60% − dense", "80% − dense"], body)


def variants_table() -> str:
    """h128 dense / top-K 50% / Block 16:32 over the seeds of variants.csv plus scaling.csv's seed."""
    scaling = by(read_csv("scaling.csv"), "axis:size", "axis:model.sparsity.default")
    runs = {
        "dense": [scaling.get(("h128", "0.0"))],
        "topk50": [scaling.get(("h128", "0.5"))],
        "block16of32": [],
    }
    for r in read_csv("variants.csv"):
        runs[r["axis:variant"]].append(r)
    body = []
    for name, found in runs.items():
        losses = [float(r["loss"]) for r in found if r]
        if not losses:
            continue
        spread = f"{(max(losses) - min(losses)) / 2:.4f}" if len(losses) > 1 else "–"
        realized = statistics.mean(float(r["S_realized"]) for r in found if r)
        body.append([name, len(losses), f"{statistics.mean(losses):.4f}", spread, f"{realized:.3f}"])
    return table(["variant (h128)", "seeds", "mean held-out loss", "± half range", "realized S"], body)


def fit_table() -> str:
    paper = json.loads((RESULTS / "fit_paper.json").read_text())
    body = []
    for name, label in (("fit_fp.json", "this stack, full precision"), ("fit_bitnet.json", "this stack, BitNet b1.58")):
        if not (RESULTS / name).exists():
            continue
        fit = json.loads((RESULTS / name).read_text())
        line = [label, fit["rows"]]
        for key in ("E", "B", "C", "alpha", "beta", "S_star"):
            low, high = fit["intervals"].get(key, (None, None))
            interval = f" [{low:.3g}, {high:.3g}]" if low is not None else ""
            line.append(f"{fit[key]:.3g}{interval}")
        body.append(line)
    published = [f"{paper[k]:.3g}" for k in ("E", "B", "C", "alpha", "beta")]
    body.append(["paper's published constants", "–"] + published + [f"{paper['S_star']:.3g} (reported 0.4558)"])
    body.append(["paper's reported optimum, BitNet b1.58", "–", "", "", "", "", "", "0.6125"])
    return table(["fit", "rows", "E", "B", "C", "α", "β", "S* [95% interval]"], body)


def ste_table() -> str:
    rows = read_csv("ste_gradients.csv")
    layers = max(int(r["layer"]) for r in rows)
    projections = list(dict.fromkeys(r["projection"] for r in rows))
    body = []
    for label, step in dict.fromkeys((r["label"], r["step"]) for r in rows):
        mine = [r for r in rows if (r["label"], r["step"]) == (label, step)]
        line = [label, step]
        for p in projections:
            norms = {int(r["layer"]): float(r["grad_norm"]) for r in mine if r["projection"] == p}
            bottom = statistics.mean(norms[i] for i in (1, 2, 3))
            top = statistics.mean(norms[i] for i in (layers - 2, layers - 1, layers))
            line.append(f"{bottom:.3g} / {top:.3g}")
        body.append(line)
    return table(["run", "step"] + [f"{p}: layers 1–3 / {layers - 2}–{layers}" for p in projections], body)


def continue_table() -> str:
    rows = read_csv("continue.csv")
    scaling = by(read_csv("scaling.csv"), "axis:size", "axis:model.sparsity.default")
    stage1 = scaling.get(("h96", "0.0"))
    body = []
    if stage1:
        body.append(["dense, stage 1 of continued (100 steps)", stage1["tokens"], f"{float(stage1['loss']):.4f}", "–"])
    for r in rows:
        tokens = int(r["tokens"]) + (
            int(stage1["tokens"]) if r["axis:variant"].startswith("continued") and stage1 else 0
        )
        body.append([r["axis:variant"], tokens, f"{float(r['loss']):.4f}", f"{float(r['S_realized']):.3f}"])
    return table(["run (h96)", "total tokens", "held-out loss", "realized S"], body)


TABLES = {
    "scaling": scaling_table,
    "gap": gap_table,
    "variants": variants_table,
    "fit": fit_table,
    "ste": ste_table,
    "continue": continue_table,
}


def render(text: str) -> str:
    def replace(match):
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{REPORT}: unknown table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def tool(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def measure_ste() -> None:
    """Each STE-study model with the estimator it was trained with, and the STE-trained weights with the
    gradient taken without it (the estimator's effect alone), early (step 20) and at the end (step 100)."""
    root = REPO / "runs" / "sweeps" / "ste"
    parts = []
    for name, runs, ste in (("as trained", STE_RUNS, "checkpoint"), ("no-STE gradient", ("topk50-ste",), "off")):
        checkpoints = [str(root / f"variant={v}" / "checkpoints" / s) for s in STE_STEPS for v in runs]
        labels = [
            a
            for _ in STE_STEPS
            for v in runs
            for a in ("--label", v if ste == "checkpoint" else f"{v} weights, {name}")
        ]
        out = RESULTS / f".ste-{ste}.csv"
        tool("tools/gradient_norms.py", *checkpoints, *labels, "--ste", ste, "--data", HELDOUT, "--csv", str(out))
        lines = out.read_text().splitlines()
        parts += lines if not parts else lines[1:]
        out.unlink()
    (RESULTS / "ste_gradients.csv").write_text("\n".join(parts) + "\n")
    plot_ste(read_csv("ste_gradients.csv"), RESULTS / "ste_gradients.png")


def plot_ste(rows, out: Path) -> None:
    """gradient_norms.py's plot of the step-20 measurements, from the merged CSV."""
    from gradient_norms import plot

    series = {}
    for r in sorted((r for r in rows if r["step"] == "20"), key=lambda r: int(r["layer"])):
        series.setdefault(r["label"], {}).setdefault(r["projection"], []).append(float(r["grad_norm"]))
    plot(series, out, ylabel="gradient L2 norm (step 20)")


def collect() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for sweep in SWEEPS:
        source = REPO / "runs" / "sweeps" / sweep / "results.csv"
        if source.exists():
            shutil.copyfile(source, RESULTS / f"{sweep}.csv")
            print(f"copied {source}")
    fit = "tools/fit_scaling_law.py"
    (RESULTS / "fit_paper.json").write_text(tool(fit, "--paper", "--json").stdout)
    combined = [
        line
        for i, name in enumerate(SCALING)
        if (RESULTS / name).exists()
        for line in (RESULTS / name).read_text().splitlines()[(1 if i else 0) :]
    ]
    (RESULTS / "scaling_all.csv").write_text("\n".join(combined) + "\n")  # every seed: what the fit reads
    (RESULTS / "fit_fp.json").write_text(
        tool(fit, str(RESULTS / "scaling_all.csv"), "--json", "--plot", str(RESULTS / "scaling_fp")).stdout
    )
    if (RESULTS / "bitnet.csv").exists():
        out = tool(fit, str(RESULTS / "bitnet.csv"), "--bitnet", "--json", "--plot", str(RESULTS / "scaling_bitnet"))
        (RESULTS / "fit_bitnet.json").write_text(out.stdout)
    measure_ste()
    print(f"wrote the fits, gradients and plots into {RESULTS}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--collect", action="store_true")
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.collect:
        collect()
        return 0
    text = REPORT.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            print(f"{REPORT}: its tables differ from the CSVs beside it; run tools/results_report.py --write")
            return 1
        print(f"{REPORT}: tables match the CSVs")
        return 0
    REPORT.write_text(rendered)
    print(f"rewrote the tables of {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
