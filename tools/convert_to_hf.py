"""Export a checkpoint (any TP/PP/EP layout, any variant) to a Hugging Face directory.

    .venv/bin/python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints --output exports/tiny-cpu

Default format ``qsparse``: our own model type (sparsity per site, block size, BitNet, MoE in config.json),
safetensors weights, and the code files beside them (``trust_remote_code=True`` with only torch and
transformers; or ``import megatron_qsparse.hf`` first and no remote code is needed). ``--format llama`` writes a
stock Llama checkpoint and is refused for sparse, BitNet or MoE models (they would silently run dense).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a step_* directory or a checkpoint root")
    parser.add_argument("--output", required=True, type=Path, help="new directory for the HF checkpoint")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the one the run trained with)")
    parser.add_argument("--format", choices=("qsparse", "llama"), default="qsparse")
    args = parser.parse_args(argv)
    from megatron_qsparse.hf.convert import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.output, args.tokenizer, args.format == "llama")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
