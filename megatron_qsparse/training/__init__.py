"""Training: the YAML config, the trainer loop, checkpoints, schedules, telemetry and the ``qsparse-pretrain`` CLI.

A regular package (not a namespace one) so that ``find_packages`` ships it in the wheel; kept free of imports so
that ``qsparse-pretrain --check`` stays as light as the modules it needs.
"""
