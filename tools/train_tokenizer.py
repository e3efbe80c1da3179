"""Train a byte-level BPE tokenizer (special token <|endoftext|>) and save it as a Hugging Face directory.

    python tools/train_tokenizer.py --input corpus/*.jsonl --output runs/tokenizer --vocab-size 8192

Inputs are read like tools/preprocess_data.py reads them (text files by paragraph, the --json-key field of
JSON lines). Exit status: 0 done, 2 bad input or usage (the message says which file, line and fix).
"""

import argparse
import sys
import time
from pathlib import Path

# Runs from a checkout without installing the package (`python tools/...`), like megatron-core's own tools.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.data.readers import PreprocessError  # noqa: E402
from megatron_qsparse.data.tokenizer import TokenizerError, load_tokenizer, train_bpe_tokenizer  # noqa: E402


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"training a byte-level BPE of {args.vocab_size} tokens on {len(args.input)} input(s)", file=sys.stderr)
    started = time.perf_counter()
    try:
        output = train_bpe_tokenizer(args.input, args.output, args.vocab_size, args.min_frequency, args.json_key)
    except (PreprocessError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(output)
    print(
        f"saved {output}: vocabulary {tokenizer.vocab_size}, eod {tokenizer.eod} "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
