"""The L2 norm of each projection's weight gradient per layer (q, k, v, o, gate, up, down), for checkpoints of any
layout: the measurement behind the paper's Fig. 2 (the straight-through estimator keeps the bottom layers'
gradients; masking the gradient too makes them vanish).

    .venv/bin/python tools/gradient_norms.py CHECKPOINT [CHECKPOINT ...] --data data/corpus_heldout_text_document \\
        [--label NAME ...] [--batches 4] [--batch-size 16] [--json] [--csv OUT.csv] [--plot OUT.png]

Each checkpoint is loaded in one process, put in training mode with its own sparsity and STE settings, and one
gradient is accumulated over ``--batches`` batches of consecutive held-out tokens (the same tokens for every
checkpoint); nothing is updated. The fused megatron-core weights are split as the Hugging Face export splits them
(q/k/v of the grouped QKV, gate/up of the GLU), so the norms are per projection. ``--ste off`` / ``--ste on``
take the gradient of the same weights with the estimator switched (off: the top-K mask also gates the gradient
passed to the layer below), which isolates the estimator's effect from what training made of the weights.

Exit status (one line on stderr naming the path): 2 bad usage (``--label`` count, more tokens asked for than
``--data`` holds), 65 no complete checkpoint in a CHECKPOINT directory or a damaged corpus, 66 a CHECKPOINT or
the ``--data`` .bin/.idx does not exist, 73 ``--csv``/``--plot`` cannot be written (read-only, permission
denied), 74 no space left.
"""

import argparse
import csv
import dataclasses
import errno
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_qsparse.errors import UserError, os_error, run_command  # noqa: E402
from megatron_qsparse.parallel.cpu_compat import silence_gpu_stack_notices  # noqa: E402

silence_gpu_stack_notices()

PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def token_batches(prefix: str, batches: int, batch_size: int, seq_length: int):
    """``batches`` [batch_size, seq_length + 1] windows of consecutive tokens from the start of a .bin/.idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_corpus(prefix)
    dataset = IndexedDataset(prefix)
    need = batches * batch_size * (seq_length + 1)
    pieces, have = [], 0
    for i in range(len(dataset)):
        pieces.append(np.asarray(dataset[i], dtype=np.int64))
        have += len(pieces[-1])
        if have >= need:
            break
    if have < need:
        raise UserError(f"{prefix}: {have} tokens, fewer than the {need} asked for; lower --batches/--batch-size")
    tokens = torch.from_numpy(np.concatenate(pieces)[:need])
    return tokens.view(batches, batch_size, seq_length + 1)


def check_corpus(prefix: str) -> None:
    """The .bin/.idx exist and the .idx is megatron-core's: else one line (66, 65), not an assertion."""
    from megatron_qsparse.data.gpt_data import token_dtype

    for suffix in (".idx", ".bin"):
        if not Path(prefix + suffix).is_file():
            raise os_error(errno.ENOENT, prefix + suffix)
    token_dtype(prefix + ".idx")


def projection_norms(checkpoint: Path, data: str, batches: int, batch_size: int, ste: str = "checkpoint") -> dict:
    from megatron_qsparse.hf.convert import input_checkpoint
    from megatron_qsparse.hf.weights import hf_to_stock, megatron_to_hf
    from megatron_qsparse.model.checkpoint import load_model, read_model_config, read_trainer_state
    from megatron_qsparse.model.gpt import build_gpt_model
    from megatron_qsparse.parallel.state import single_process_model_parallel
    from megatron_qsparse.training.step import lm_loss

    path = input_checkpoint(checkpoint)
    cfg = read_model_config(path)
    if ste != "checkpoint":
        cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, ste=ste == "on"))
    windows = token_batches(data, batches, batch_size, cfg.seq_length)
    with single_process_model_parallel():
        model = build_gpt_model(cfg, cfg.to_transformer_config())
        load_model(model, path)
        model.train()
        positions = torch.arange(cfg.seq_length).expand(batch_size, -1)
        for window in windows:
            logits = model(window[:, :-1], positions, None)
            loss = lm_loss(logits, window[:, 1:], torch.ones(batch_size, cfg.seq_length)) / batches
            loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    stock = hf_to_stock(megatron_to_hf(grads, cfg), cfg)
    norms = {
        short: [float(stock[f"model.layers.{i}.{name}.weight"].norm()) for i in range(cfg.num_layers)]
        for short, name in PROJECTIONS.items()
    }
    return {
        "checkpoint": str(path),
        "step": read_trainer_state(path)["step"],
        "sparsity": cfg.sparsity.ratios(),
        "ste": cfg.sparsity.ste,
        "layers": cfg.num_layers,
        "grad_norm": norms,
    }


def check_output_file(path: Path) -> None:
    """An output that cannot be written is named now, not after the gradients are computed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:  # EEXIST: a parent is a file
        raise os_error(errno.ENOTDIR if err.errno == errno.EEXIST else err.errno, path) from None


def plot(series: dict, out: Path, ylabel: str = "gradient L2 norm") -> None:
    """One panel per projection, the norm against the layer (bottom first); ``series``: label -> the
    ``grad_norm`` mapping (projection -> norms per layer) of one measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 4, figsize=(12, 6), sharey=True)
    axes = grid.flatten()
    axes[-1].axis("off")
    for ax, short in zip(axes, PROJECTIONS):
        for label, norms in series.items():
            ax.plot(range(1, len(norms[short]) + 1), norms[short], marker="o", ms=3, lw=1, label=label)
        ax.set_title(short)
        ax.set_xlabel("layer")
        ax.set_yscale("log")
    for ax in grid[:, 0]:
        ax.set_ylabel(ylabel)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return run_command(_main, argv, "gradient_norms.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="a .bin/.idx prefix (held-out tokens)")
    parser.add_argument("--label", action="append", help="a name per checkpoint (default: the directory names)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--ste", choices=("checkpoint", "on", "off"), default="checkpoint", help="the estimator (default: as trained)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--csv", type=Path, help="write label, step, layer, projection, grad_norm rows there")
    parser.add_argument("--plot", type=Path, help="write a PNG: one panel per projection, norm vs layer")
    args = parser.parse_args(argv)
    labels = args.label or [c.resolve().parent.name if c.name == "checkpoints" else c.name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise UserError(f"{len(labels)} --label for {len(args.checkpoints)} checkpoints; give one per checkpoint")
    # Every input and output is checked before the first checkpoint loads.
    for checkpoint in args.checkpoints:
        if not checkpoint.exists():
            raise os_error(errno.ENOENT, checkpoint)
    for output in (args.csv, args.plot):
        if output is not None:
            check_output_file(output)
    check_corpus(args.data)
    results = [projection_norms(c, args.data, args.batches, args.batch_size, args.ste) for c in args.checkpoints]
    rows = [
        (label, r["step"], layer + 1, short, norms[layer])
        for label, r in zip(labels, results)
        for short, norms in r["grad_norm"].items()
        for layer in range(r["layers"])
    ]
    if args.csv:
        from megatron_qsparse import atomic

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["label", "step", "layer", "projection", "grad_norm"])
        writer.writerows(rows)
        atomic.write_text(args.csv, text.getvalue())
    if args.plot:
        plot({label: r["grad_norm"] for label, r in zip(labels, results)}, args.plot)
    if args.json:
        print(json.dumps([dict(r, label=label) for label, r in zip(labels, results)], indent=1))
        return 0
    print(f"gradient L2 norm per layer (bottom first), {args.batches} x {args.batch_size} sequences of {args.data}")
    for label, r in zip(labels, results):
        print(f"\n{label} (step {r['step']}, sparsity {r['sparsity']}, ste {r['ste']})")
        print("layer " + "".join(f"{short:>10}" for short in PROJECTIONS))
        for layer in range(r["layers"]):
            print(f"{layer + 1:>5} " + "".join(f"{r['grad_norm'][s][layer]:>10.3g}" for s in PROJECTIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
