"""Train a byte-level BPE tokenizer (special token <|endoftext|>) and save it as a Hugging Face directory.

    python tools/train_tokenizer.py --input corpus/*.jsonl --output runs/tokenizer --vocab-size 8192

Inputs are read like tools/preprocess_data.py reads them (text files by paragraph, the --json-key field of
JSON lines); a long document reaches the trainer in pieces, so memory does not grow with its size. The output
directory is created (under a hidden temporary name beside it) before training starts, so an output that cannot
be written fails at once.

Errors are one line on stderr. Exit status (megatron_qsparse/errors.py):
  0    done
  2    bad input or usage: the message names the file, the line (or row) and the fix (--skip-bad skips bad records)
  66   an input file does not exist
  73   the output cannot be created: permission denied, read-only file system
  74   no space left on device (the free space is named), another I/O error
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM)
Whatever the status, no partial tokenizer is left: the temporary directory is removed on any error, SIGINT or
SIGTERM (during the trainer's final merge computation, which cannot be interrupted, only once it returns).
"""

import argparse
import sys
import time
from pathlib import Path

# Runs from a checkout without installing the package (`python tools/...`), like megatron-core's own tools.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from megatron_qsparse.errors import run_tool  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        metavar="FILE",
        help="text or JSON-lines files (parquet and save_to_disk directories work too)",
    )
    parser.add_argument("--output", required=True, type=Path, help="the tokenizer directory to create")
    parser.add_argument("--vocab-size", type=int, default=8192, help="default: 8192")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: 2)")
    parser.add_argument("--json-key", default="text", help="the field holding the text (default: text)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count bad records (and warn about empty files) instead of stopping",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_tool(_train, argv, "train_tokenizer.py")


def _train(argv: list[str] | None) -> int:
    args = parse_args(argv)
    print(f"training a byte-level BPE of {args.vocab_size} tokens on {len(args.input)} input(s)", file=sys.stderr)
    started = time.perf_counter()
    output = train_bpe_tokenizer(
        args.input, args.output, args.vocab_size, args.min_frequency, args.json_key, skip_bad=args.skip_bad
    )
    tokenizer = load_tokenizer(output)
    print(
        f"saved {output}: vocabulary {tokenizer.vocab_size}, eod {tokenizer.eod} "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
