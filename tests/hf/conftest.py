from training.conftest import corpus  # noqa: F401  (the shared real-corpus fixture)
