"""Export a checkpoint (any TP/PP/EP layout, any variant) to a Hugging Face directory.

    .venv/bin/python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints --output exports/tiny-cpu

Default format ``qsparse``: our own model type (sparsity per site, block size, BitNet, MoE in config.json),
safetensors weights, and the code files beside them (``trust_remote_code=True`` with only torch and
transformers; or ``import megatron_qsparse.hf`` first and no remote code is needed). ``--format llama`` writes a
stock Llama checkpoint and is refused for sparse, BitNet or MoE models (they would silently run dense).

Exit status (one line on stderr naming the path): 2 bad usage (``--format llama`` for a sparse model, ...), 65 no
complete checkpoint in ``--checkpoint`` or a damaged one, 66 ``--checkpoint`` or ``--tokenizer`` does not exist,
73 ``--output`` exists and is not empty or cannot be created (read-only, permission denied), 74 no space left.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.parallel.cpu_compat import silence_gpu_stack_notices  # noqa: E402

silence_gpu_stack_notices()

from megatron_qsparse.errors import UserError, run_command  # noqa: E402


def main(argv=None) -> int:
    return run_command(_main, argv, "convert_to_hf.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a step_* directory or a checkpoint root")
    parser.add_argument("--output", required=True, type=Path, help="new directory for the HF checkpoint")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the one the run trained with)")
    parser.add_argument("--format", choices=("qsparse", "llama"), default="qsparse")
    args = parser.parse_args(argv)
    from megatron_qsparse.hf.convert import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.output, args.tokenizer, args.format == "llama")
    except ValueError as err:
        if type(err) is not ValueError:
            raise  # the project's own kinds are reported by run_command; others are bugs
        raise UserError(str(err)) from None  # the conversion's refusals (--format llama of a sparse model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
