"""Tokenize a corpus into megatron-core's .bin/.idx (one sequence per document, each ending in the eod token).

    python tools/preprocess_data.py --input corpus/*.jsonl --tokenizer runs/tokenizer \\
        --output-prefix runs/data/corpus --workers 2

Writes PREFIX.bin and PREFIX.idx (megatron-core's IndexedDataset, one sequence per document) and the sidecar
PREFIX.meta.json recording the tokenizer, which training checks against its own. A text file is one document by
default, read and tokenized a mebibyte at a time: memory does not grow with a document's size.

Inputs: text (.txt, .md), JSON lines (.jsonl, .ndjson, or .json), JSON arrays (a .json file starting with "[",
[{"text": ...}, ...]), parquet, save_to_disk directories. Text and JSON files may be compressed: .gz, .xz, .zst
(e.g. corpus.jsonl.gz; .zst needs `pip install zstandard`), read as they are decompressed.

Output names. --json-key KEY (default "text") reads that field and writes PREFIX.bin/.idx exactly. --json-keys
K1 [K2 ...] is Megatron-LM's flag and naming: one corpus per field, at PREFIX_<key>_document, so

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer runs/tokenizer \\
        --output-prefix data/my-corpus --json-keys text

writes data/my-corpus_text_document.bin/.idx/.meta.json: give training data.train=[data/my-corpus_text_document].

Errors are one line on stderr. Exit status (megatron_qsparse/errors.py):
  0    done
  2    bad input or usage: the message names the file, the line (or row) and the fix (--skip-bad skips bad records)
  66   an input file, or the tokenizer directory, does not exist
  73   the output cannot be created: permission denied, read-only file system
  74   no space left on device (the free space is named), another I/O error
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM)
Whatever the status, nothing partial is left: the output is written under hidden temporary names beside it,
renamed into place only when complete, and removed on any error, SIGINT or SIGTERM.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing the package (`python tools/...`), like megatron-core's own tools.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.data.preprocess import preprocess, preprocess_json_keys  # noqa: E402
from megatron_qsparse.data.readers import INPUT_FORMATS, TEXT_UNITS  # noqa: E402
from megatron_qsparse.errors import run_tool  # noqa: E402


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
        help="default: by extension (.txt/.md text, .jsonl/.json jsonl, a .json starting with [ json, .parquet, "
        "a directory), under a .gz/.xz/.zst",
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--json-key", help="the field (or column) holding the text (default: text); writes PREFIX.*")
    keys.add_argument(
        "--json-keys",
        nargs="+",
        metavar="KEY",
        help="Megatron-LM's naming: for each field KEY, a corpus at PREFIX_<KEY>_document.bin/.idx",
    )
    parser.add_argument(
        "--text-unit",
        choices=TEXT_UNITS,
        default="file",
        help="what one document is in a text file (default: the whole file)",
    )
    parser.add_argument("--tokenizer", required=True, type=Path, help="a local Hugging Face tokenizer directory")
    parser.add_argument(
        "--output-prefix",
        required=True,
        type=Path,
        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json (PREFIX_<key>_document.* with --json-keys)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count bad records (and warn about empty files) instead of stopping",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_tool(_preprocess, argv, "preprocess_data.py")


def _preprocess(argv: list[str] | None) -> int:
    args = parse_args(argv)
    options = dict(
        text_unit=args.text_unit, workers=args.workers, skip_bad=args.skip_bad, progress=not args.no_progress
    )
    if args.json_keys:
        preprocess_json_keys(
            args.input, args.output_prefix, args.tokenizer, args.json_keys, input_format=args.input_format, **options
        )
    else:
        preprocess(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer_path=args.tokenizer,
            input_format=args.input_format,
            json_key=args.json_key or "text",  # no argparse default: it would hide --json-key text next to --json-keys
            **options,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
