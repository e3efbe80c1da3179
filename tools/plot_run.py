"""PNG plots of a training run, from its metrics.jsonl.

    .venv/bin/python tools/plot_run.py RUN_DIR [--output DIR] [--json]

Writes loss.png (training and held-out loss), learning_rate.png, grad_norm.png, sparsity.png (realized sparsity
per site), tokens_per_s.png and, once the run has evaluated, layer_sparsity.png (layer × site heat map of the
last evaluation step) and layer_grad_norm.png (per-layer gradient norms at the evaluation steps) into
RUN_DIR/plots/ (or DIR), each file written atomically. Prints the paths written; ``--json`` prints them as a
JSON object. Works on a run still training (a record being written is left out).

Exit status: 0 done, 65 metrics.jsonl has no records or a line that is not JSON, 66 RUN_DIR or its metrics.jsonl
does not exist, 73/74 the output cannot be written.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_qsparse.errors import run_command  # noqa: E402
from megatron_qsparse.training.plots import write_plots  # noqa: E402


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run directory (log.run_dir), holding metrics.jsonl")
    parser.add_argument("--output", type=Path, help="where the PNGs go (default: RUN_DIR/plots)")
    parser.add_argument("--json", action="store_true", help='print {"run_dir": ..., "plots": [...]}')
    args = parser.parse_args(argv)
    paths = write_plots(args.run_dir, args.output)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "plots": [str(p) for p in paths]}, indent=1))
    else:
        print("\n".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv, "plot_run.py")


if __name__ == "__main__":
    sys.exit(main())
