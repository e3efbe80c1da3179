"""``python -m megatron_qsparse.data.corpus``: see ``cli``."""

from megatron_qsparse.data.corpus.cli import main

raise SystemExit(main())
