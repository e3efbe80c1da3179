"""Fit Q-Sparse's scaling law L(N, S) = E + (B + C·exp(β/(1 − S)))/N^α to training results, and report the
inference-optimal sparsity S* with bootstrap intervals.

    .venv/bin/python tools/fit_scaling_law.py results.csv [--bitnet] [--json] [--plot DIR] [--bootstrap 200]
    .venv/bin/python tools/fit_scaling_law.py --paper [--json]

RESULTS.csv has a header with at least ``N, S, loss`` (N: block linear parameters, S: sparsity in [0, 1), loss:
held-out loss in nats) and optionally ``tokens, bitnet, seed`` (more columns are ignored; ``tools/sweep.py``
writes such a file). Without ``--bitnet`` the full-precision rows are fitted, with it the BitNet b1.58 rows.
The fit: Huber loss (δ = 1e-3) on log residuals, L-BFGS-B from a grid of (α, β) with E, B, C by linear least
squares at each (megatron_qsparse/sparsity/scaling_law.py). S* minimizes A(S)·(1 − S)^α, the part of the
inference-optimal form L(N_a, S) = E + A(S)·((1 − S)/N_a)^α that depends on S; N/N_a = 1/(1 − S*) there.
``--paper`` reports what the paper's published (rounded) constants give, beside the optima it reports.
Exit status (one line on stderr): 2 bad input, with the file, row and column named; 66 RESULTS.csv does not
exist; 73 the ``--plot`` directory cannot be written (read-only, permission denied); 74 no space left.
"""

import argparse
import csv
import errno
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megatron_qsparse.errors import EXIT_NO_INPUT, UserError, os_error, run_command  # noqa: E402
from megatron_qsparse.sparsity.scaling_law import (  # noqa: E402
    HUBER_DELTA,
    PAPER_CONSTANTS,
    PAPER_S_STAR,
    PARAMETERS,
    Law,
    fit_with_intervals,
)

REQUIRED = ("N", "S", "loss")
TRUE = {"1", "true", "yes", "bitnet"}
FALSE = {"", "0", "false", "no", "fp", "none"}


class InputError(UserError, ValueError):
    """A results file the fit cannot use; the message names the file, row and column."""


class MissingResults(InputError):
    exit_code = EXIT_NO_INPUT


def read_results(path: Path, bitnet: bool):
    """(N, S, loss) arrays of the rows of the chosen precision; every row checked, errors name file:row."""
    if path.is_dir():
        raise InputError(f"{path}: a directory; give the CSV file (tools/sweep.py writes OUTPUT/results.csv)")
    if not path.is_file():
        raise MissingResults(f"{path}: no such file (tools/sweep.py writes results.csv in its output directory)")
    try:
        return _read_rows(path, bitnet)
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: not a UTF-8 CSV file ({err})") from None


def _read_rows(path: Path, bitnet: bool):
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the header needs {list(REQUIRED)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            flag = (row.get("bitnet") or "").strip().lower()
            if flag not in TRUE | FALSE:
                raise InputError(f"{path}:{line}: column bitnet: {flag!r} is not true/false")
            if (flag in TRUE) != bitnet:
                continue
            values = []
            for column in REQUIRED:
                try:
                    values.append(float(row[column]))
                except (TypeError, ValueError):
                    raise InputError(f"{path}:{line}: column {column}: {row[column]!r} is not a number") from None
            n, s, loss = values
            if not (n > 0 and 0 <= s < 1 and loss > 0 and np.isfinite(loss)):
                raise InputError(f"{path}:{line}: need N > 0, 0 <= S < 1 and a finite loss > 0, got {values}")
            rows.append(values)
    table = np.array(rows, dtype=float).reshape(-1, 3)
    kind = "BitNet b1.58" if bitnet else "full-precision"
    if len(np.unique(table[:, 0])) < 2 or len(np.unique(table[:, 1])) < 3 or len(table) < 6:
        raise InputError(
            f"{path}: {len(table)} {kind} rows with {len(np.unique(table[:, 0]))} sizes and "
            f"{len(np.unique(table[:, 1]))} sparsities; the fit needs at least 6 rows, 2 sizes and 3 sparsities"
        )
    return table[:, 0], table[:, 1], table[:, 2]


def paper_report() -> dict:
    law = Law(**PAPER_CONSTANTS)
    s_star = law.optimal_sparsity()
    return dict(
        PAPER_CONSTANTS,
        S_star=s_star,
        N_over_N_a=1.0 / (1.0 - s_star),
        reported_S_star=PAPER_S_STAR,
        note="the published constants are rounded to two decimals; they give this S*, not the reported one",
    )


def print_fit(report: dict, title: str) -> None:
    print(title)
    print(f"{'constant':<10}{'value':>12}{'95% interval':>28}")
    for name in PARAMETERS + ("S_star",):
        low_high = report.get("intervals", {}).get(name)
        interval = f"[{low_high[0]:.4g}, {low_high[1]:.4g}]" if low_high else "-"
        print(f"{name:<10}{report[name]:>12.4g}{interval:>28}")
    print(f"N/N_a at S*: {report['N_over_N_a']:.3f}")
    reported = ", ".join(f"{k} {v:.2%}" for k, v in PAPER_S_STAR.items())
    print(f"paper's reported S*: {reported}")


def plot(law: Law, N, S, loss, s_star: float, directory: Path) -> list:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    S = np.round(S, 6)  # 1 - N_a/N carries float noise (0.6000000000000001): one curve per configured S
    sparsities = sorted(set(S.tolist()))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sparsities)))
    grid_N = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
    for name, xs, curve in (
        ("loss_vs_N.png", N, lambda s: (grid_N, law.loss(grid_N, s))),
        ("loss_vs_N_a.png", N * (1 - S), lambda s: (grid_N * (1 - s), law.loss(grid_N, s))),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for s, color in zip(sparsities, colors):
            keep = S == s
            ax.scatter(xs[keep], loss[keep], color=color, s=18, label=f"S = {s:.2f}")
            ax.plot(*curve(s), color=color, lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("N (block linear parameters)" if name == "loss_vs_N.png" else "N_a (activated parameters)")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        written.append(directory / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    grid_S = np.linspace(0, 0.9, 200)
    for n_a in np.geomspace((N * (1 - S)).min(), (N * (1 - S)).max(), 3):
        ax.plot(grid_S, law.loss_at_activated(n_a, grid_S), lw=1, label=f"N_a = {n_a / 1e6:.1f}M")
    ax.axvline(s_star, color="k", ls="--", lw=1, label=f"S* = {s_star:.1%}")
    ax.set_xlabel("sparsity S")
    ax.set_ylabel("fitted loss at fixed N_a")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "loss_vs_S_at_fixed_N_a.png", dpi=120)
    plt.close(fig)
    written.append(directory / "loss_vs_S_at_fixed_N_a.png")
    return written


def check_plot_directory(directory: Path) -> None:
    """An unwritable ``--plot`` directory is named before the fit runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:  # EEXIST: it, or a parent, is a file
        raise os_error(errno.ENOTDIR if err.errno == errno.EEXIST else err.errno, directory) from None


def main(argv=None) -> int:
    return run_command(_main, argv, "fit_scaling_law.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, help="CSV with columns N, S, loss [tokens, bitnet, seed]")
    parser.add_argument("--bitnet", action="store_true", help="fit the BitNet b1.58 rows (default: full precision)")
    parser.add_argument("--paper", action="store_true", help="what the paper's published constants give")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write the PNGs there")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.paper:
        report = paper_report()
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print_fit(report, "the paper's published constants (full precision, rounded)")
        return 0
    if args.results is None:
        parser.print_usage(sys.stderr)
        print("fit_scaling_law.py: error: give RESULTS.csv or --paper", file=sys.stderr)
        return 2
    N, S, loss = read_results(args.results, args.bitnet)
    if args.plot:
        check_plot_directory(args.plot)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    fitted = fit_with_intervals(N, S, loss, bootstrap=args.bootstrap, seed=args.seed, progress=log)
    report = dict(fitted.as_dict(), precision="BitNet b1.58" if args.bitnet else "full precision")
    report["source"] = str(args.results)
    if args.plot:
        report["plots"] = [str(p) for p in plot(fitted.law, N, S, loss, fitted.S_star, args.plot)]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_fit(
            report,
            f"{report['precision']} fit of {args.results}: {fitted.rows} rows, Huber δ = {HUBER_DELTA:g} on "
            f"log residuals, {fitted.bootstrap} bootstrap refits",
        )
        for path in report.get("plots", []):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
