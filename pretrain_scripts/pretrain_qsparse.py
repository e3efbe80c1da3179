"""Training entry point: see ``megatron_qsparse/training/cli.py`` (also installed as ``qsparse-pretrain``)."""

import sys

from megatron_qsparse.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
