"""Import a dense Llama / Mistral / Qwen2 Hugging Face directory into our checkpoint format, ready for
``qsparse-pretrain`` continue-training (``train.mode=continue``, ``train.init_from=OUTPUT``, a sparsity ramp) or
finetuning (``train.mode=sft``).

    .venv/bin/python tools/convert_from_hf.py --hf /models/Mistral-7B-v0.1 --output checkpoints/mistral-7b

The checkpoint is a megatron-core distributed checkpoint: it loads under any TP/PP layout, so ``--tp/--pp``
only check that the layout fits the model. The tokenizer is copied to OUTPUT/tokenizer.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, type=Path, help="local HF model directory (safetensors)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)
    from megatron_qsparse.hf.config_mapping import config_from_stock
    from megatron_qsparse.hf.convert import import_stock
    from megatron_qsparse.parallel.layout import ParallelLayout

    try:
        config = json.loads((args.hf / "config.json").read_text())
        config_from_stock(config, str(args.hf / "config.json")).validate_layout(ParallelLayout(tp=args.tp, pp=args.pp))
        import_stock(args.hf, args.output)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
