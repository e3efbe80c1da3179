"""Import a dense Llama / Mistral / Qwen2 Hugging Face directory into our checkpoint format, ready for
``qsparse-pretrain`` continue-training (``train.mode=continue``, ``train.init_from=OUTPUT``, a sparsity ramp) or
finetuning (``train.mode=sft``).

    .venv/bin/python tools/convert_from_hf.py --hf /models/Mistral-7B-v0.1 --output checkpoints/mistral-7b

The checkpoint is a megatron-core distributed checkpoint: it loads under any TP/PP layout, so ``--tp/--pp``
only check that the layout fits the model. The tokenizer is copied to OUTPUT/tokenizer.

Exit status (one line on stderr naming the path): 2 a model or layout the import does not support, 65 ``--hf``
holds no valid config.json or no safetensors weights, 66 ``--hf`` or its config.json does not exist, 73
``--output`` exists and is not empty or cannot be created (read-only, permission denied), 74 no space left.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qsparse.parallel.cpu_compat import silence_gpu_stack_notices  # noqa: E402

silence_gpu_stack_notices()

from megatron_qsparse.errors import DataError, UserError, run_command  # noqa: E402


def main(argv=None) -> int:
    return run_command(_main, argv, "convert_from_hf.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, type=Path, help="local HF model directory (safetensors)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)
    from megatron_qsparse.hf.config_mapping import config_from_stock
    from megatron_qsparse.hf.convert import import_stock, read_stock_config
    from megatron_qsparse.parallel.layout import ParallelLayout

    try:
        config = read_stock_config(args.hf)
        try:
            model = config_from_stock(config, str(args.hf / "config.json"))
        except KeyError as err:
            raise DataError(f"{args.hf / 'config.json'}: no {err} key; is it a Llama/Mistral/Qwen2 config?") from None
        model.validate_layout(ParallelLayout(tp=args.tp, pp=args.pp))
        import_stock(args.hf, args.output)
    except ValueError as err:
        if type(err) is not ValueError:
            raise  # the project's own kinds are reported by run_command; others are bugs
        raise UserError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
