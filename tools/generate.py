"""Generate text from a Q-Sparse Hugging Face export with the decode engine, streaming it as it is produced.

    .venv/bin/python tools/generate.py --model exports/tiny-cpu --prompt "In the beginning" --max-new-tokens 64
    .venv/bin/python tools/generate.py --model exports/tiny-cpu --prompt "Emma" --temperature 0.8 --top-p 0.9 --seed 1
    .venv/bin/python tools/generate.py --model exports/tiny-cpu --prompt-ids 5,17,301 --json

The text goes to stdout as each token arrives; the last line (stderr) gives prefill and decode tokens/s. With
``--json`` nothing streams: one JSON object (text, token ids, counts, tokens/s) is printed at the end. Greedy
unless ``--temperature`` > 0. Generation stops at ``--max-new-tokens`` or the tokenizer's end-of-document token
(``--ignore-eos`` to go on).

Exit status (one line on stderr naming the path): 2 bad input (a prompt longer than the cache, bad ``--prompt-ids``,
an export the engine cannot run, ...), 66 the export (its config.json) does not exist.
"""

import argparse
import errno
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.errors import UserError, os_error, run_command  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="export directory (config.json + safetensors)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the export's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache positions (default: the model's)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def load_tokenizer_of(model: Path, required: bool):
    from megatron_qsparse.data.tokenizer import TOKENIZER_FILES, load_tokenizer

    if not any((model / name).exists() for name in TOKENIZER_FILES):
        if required:
            raise UserError(
                f"{model} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --prompt-ids, or "
                "export with tools/convert_to_hf.py --tokenizer DIR"
            )
        return None
    return load_tokenizer(model)


class TextStream:
    """Prints the text of the ids so far as it grows; holds back an unfinished UTF-8 character (BPE bytes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.detokenize(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


def check_export(model: Path) -> None:
    """An export is a directory with a config.json: a missing one is named before anything loads."""
    if model.exists() and not model.is_dir():
        raise os_error(errno.ENOTDIR, model)
    if not (model / "config.json").is_file():
        raise os_error(errno.ENOENT, model / "config.json")


def main(argv=None) -> int:
    return run_command(_main, argv, "generate.py")


def _main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_qsparse.inference.engine import Engine

    check_export(args.model)
    # EngineError (bad input) and the other project errors: one line, exit 2, by run_command.
    tokenizer = load_tokenizer_of(args.model, required=args.prompt is not None)
    if args.prompt is not None:
        ids = tokenizer.tokenize(args.prompt)
    else:
        try:
            ids = [int(i) for i in args.prompt_ids.split(",") if i.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers") from None
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, threads=args.threads, max_seq_len=args.max_seq_len)
    eos = None if args.ignore_eos or tokenizer is None else tokenizer.eod
    stream = None
    if not args.json and tokenizer is not None:
        sys.stdout.write(args.prompt if args.prompt is not None else tokenizer.detokenize(ids))
        stream = TextStream(tokenizer)
    elif not args.json:
        stream = lambda token: print(token, end=" ", flush=True)  # noqa: E731
    new = engine.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
        on_token=stream,
    )
    s = engine.stats
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "dtype": args.dtype,
                    "threads": engine.threads,
                    "prompt_ids": ids,
                    "new_ids": new,
                    "text": tokenizer.detokenize(new) if tokenizer is not None else None,
                    "prompt_tokens": s.prompt_tokens,
                    "new_tokens": s.new_tokens,
                    "prefill_tokens_per_s": s.prefill_tokens_per_s,
                    "decode_tokens_per_s": s.decode_tokens_per_s,
                },
                indent=2,
            )
        )
    else:
        print()
        print(
            f"prefill {s.prompt_tokens} tokens: {s.prefill_tokens_per_s:.1f} tok/s; decode {s.new_tokens} tokens: "
            f"{s.decode_tokens_per_s:.1f} tok/s ({args.dtype}, {engine.threads} threads)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
