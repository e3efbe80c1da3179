"""Tokenize a corpus into megatron-core's .bin/.idx (one sequence per document, each ending in the eod token).

    python tools/preprocess_data.py --input corpus/*.jsonl --tokenizer runs/tokenizer \\
        --output-prefix runs/data/corpus --workers 2

Exit status: 0 done, 2 bad input or usage (the message says which file, line and fix), 130 interrupted.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing the package (`python tools/...`), like megatron-core's own tools.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.data.preprocess import preprocess  # noqa: E402
from megatron_qsparse.data.readers import INPUT_FORMATS, TEXT_UNITS, PreprocessError  # noqa: E402
from megatron_qsparse.data.tokenizer import TokenizerError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        metavar="PATH",
        help="text, JSON-lines or parquet files, or save_to_disk directories",
    )
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="default: by extension (.txt/.md text, .jsonl/.json jsonl, .parquet, a directory)",
    )
    parser.add_argument("--json-key", default="text", help="the field (or column) holding the text (default: text)")
    parser.add_argument(
        "--text-unit",
        choices=TEXT_UNITS,
        default="file",
        help="what one document is in a text file (default: the whole file)",
    )
    parser.add_argument("--tokenizer", required=True, type=Path, help="a local Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count bad records (and warn about empty files) instead of stopping",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preprocess(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer_path=args.tokenizer,
            input_format=args.input_format,
            json_key=args.json_key,
            text_unit=args.text_unit,
            workers=args.workers,
            skip_bad=args.skip_bad,
            progress=not args.no_progress,
        )
    except (PreprocessError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
