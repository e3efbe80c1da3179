"""`make pretrain`: the whole default run on a fresh machine, each stage cached once done.

1. fetch the embedded public-domain corpus (Debian packages; cached under ~/.cache/megatron_qsparse)
2. train a byte-level BPE tokenizer on its training split (data/tokenizer)
3. preprocess both splits into megatron-core .bin/.idx (data/corpus_{train,heldout}_text_document)
4. train the tiny Q-Sparse model on CPU (pretrain_scripts/configs/tiny-cpu.yaml), checkpoint, evaluate
5. print a summary: loss before/after, held-out loss and bits per byte, realized sparsity, N and N_a, and the
   plots of the run (tools/plot_run.py) written to its run directory's plots/

Extra arguments go to the trainer, e.g. ``--set train.steps=40`` (``make pretrain ARGS="--set train.steps=40"``).
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_qsparse.data.corpus import fetch_default_corpus  # noqa: E402
from megatron_qsparse.training.config import load_config  # noqa: E402

CONFIG = REPO / "pretrain_scripts" / "configs" / "tiny-cpu.yaml"
DATA = REPO / "data"
VOCAB_SIZE = 8192


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def prepare_data(corpus) -> None:
    """Tokenizer and .bin/.idx, rebuilt when the corpus changed (its manifest is the cache key)."""
    from megatron_qsparse.data.preprocess import preprocess
    from megatron_qsparse.data.tokenizer import train_bpe_tokenizer

    stamp = DATA / "corpus.manifest.json"
    manifest = corpus.manifest.read_text()
    prefixes = {"train": DATA / "corpus_train_text_document", "heldout": DATA / "corpus_heldout_text_document"}
    ready = (
        stamp.exists()
        and stamp.read_text() == manifest
        and all(p.with_suffix(".idx").exists() for p in prefixes.values())
        and (DATA / "tokenizer").is_dir()
    )
    if ready:
        print(f"data ready in {DATA} (tokenizer, {', '.join(p.name for p in prefixes.values())})")
        return
    DATA.mkdir(exist_ok=True)
    t0 = stage(f"training a {VOCAB_SIZE}-token byte-level BPE on {corpus.train}")
    tokenizer = train_bpe_tokenizer([corpus.train], DATA / "tokenizer", vocab_size=VOCAB_SIZE)
    print(f"tokenizer saved to {tokenizer} ({time.time() - t0:.1f}s)")
    for split, source in (("train", corpus.train), ("heldout", corpus.heldout)):
        stage(f"preprocessing the {split} split")
        stats = preprocess([source], prefixes[split], tokenizer, input_format="jsonl", workers=2)
        print(f"{stats.documents} documents, {stats.tokens:,} tokens -> {prefixes[split]}.bin/.idx")
    stamp.write_text(manifest)


def summarize_run(config, started: float) -> None:
    from megatron_qsparse.model.summary import summarize

    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = [r for r in records if not r.get("skipped")]
    evals = [r for r in records if "eval" in r]
    model = summarize(config.model)
    last = trained[-1]
    print("\n== summary")
    print(
        f"model              {config.model_preset}: {model['total_parameters'] / 1e6:.2f}M parameters, "
        f"N = {model['block_linear_parameters_N'] / 1e6:.2f}M block-linear, "
        f"N_a = {model['activated_parameters_N_a'] / 1e6:.2f}M configured / "
        f"{last['activated_params'] / 1e6:.2f}M measured"
    )
    print(f"training loss      {trained[0]['loss']:.3f} (step 1) -> {last['loss']:.3f} (step {last['step']})")
    if evals:
        first, final = evals[0], evals[-1]
        print(
            f"held-out loss      {first['eval']['loss']:.3f} (step {first['step']}) -> {final['eval']['loss']:.3f} "
            f"(step {final['step']}), {final['eval']['bits_per_byte']:.3f} bits per byte"
        )
    print(
        "realized sparsity  "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in last["sparsity"].items())
        + " (input of each projection, averaged over layers; ReLU² adds natural zeros at fc2)"
    )
    throughput = sum(r["tokens_per_s"] for r in trained[1:]) / max(len(trained) - 1, 1)
    print(f"throughput         {throughput:,.0f} tokens/s (mean over steps)")
    print(f"checkpoints        {config.checkpoint_dir}")
    print(f"metrics            {config.run_dir / 'metrics.jsonl'}")
    print(f"tensorboard        tensorboard --logdir {config.run_dir / 'tensorboard'}")
    draw_plots(config.run_dir)
    print(f"wall time          {time.time() - started:.0f}s")


def draw_plots(run_dir: Path) -> list:
    """The run's PNGs (loss, learning rate, gradient norm, sparsity, heat maps, throughput), their paths printed.
    The run is done and its summary printed: a plot that cannot be written is a line saying so, not a failure."""
    from megatron_qsparse.errors import UserError, exit_code_and_message
    from megatron_qsparse.training.plots import write_plots

    try:
        paths = write_plots(run_dir)
    except (UserError, OSError, ValueError) as err:
        known = exit_code_and_message(err)
        if known is None:
            raise
        print(f"plots              not written: {known[1]} (tools/plot_run.py {run_dir} draws them again)")
        return []
    print(f"plots              {paths[0].parent}/")
    for path in paths:
        print(f"                   {path}")
    return paths


def run_trainer(command: list) -> int:
    """The trainer's exit code. A stop signal is the trainer's to handle (finish the step, checkpoint): Ctrl-C
    reaches it from the terminal by itself, a SIGTERM sent to this process is passed on; then we wait for it."""
    from megatron_qsparse.errors import Terminated

    with subprocess.Popen(command, cwd=REPO) as proc:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
            except Terminated:
                proc.send_signal(signal.SIGTERM)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for the training stage")
    args, trainer_args = parser.parse_known_args(argv)
    started = time.time()
    stage("fetching the default corpus")
    corpus = fetch_default_corpus()
    prepare_data(corpus)
    overrides = [trainer_args[i + 1] for i, a in enumerate(trainer_args[:-1]) if a == "--set"]
    config = load_config(CONFIG, overrides)
    stage(f"training ({CONFIG.relative_to(REPO)}) on {args.nproc} process(es)")
    trainer = [sys.executable, str(REPO / "pretrain_scripts" / "pretrain_qsparse.py"), "--config", str(CONFIG)]
    if args.nproc > 1:
        trainer += ["--nproc-per-node", str(args.nproc)]
    code = run_trainer(trainer + trainer_args)
    if code != 0:
        print(f"training exited with {code}", file=sys.stderr)
        return code
    summarize_run(config, started)
    return 0


if __name__ == "__main__":
    from megatron_qsparse.errors import run_tool

    sys.exit(run_tool(main, None, "make pretrain"))  # one line per error; Ctrl-C/SIGTERM remove temporaries
