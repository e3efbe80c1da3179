"""Megatron-LM's data habits through the real trainer: a flat blend and ``data.split`` (its ``--split``), whose
valid share becomes the held-out set that is evaluated."""

import pytest

from training.conftest import metrics, run_training, write_config

pytestmark = pytest.mark.slow


def test_split_holds_out_documents_of_the_training_corpus_and_evaluates_them(corpus, tmp_path):
    config = write_config(
        tmp_path / "config.yaml",
        corpus,
        tmp_path / "run",
        data={"train": [1.0, corpus["train"]], "valid": [], "split": "90,10,0"},
        train={"steps": 2},
    )
    proc = run_training(config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = metrics(tmp_path / "run")[-1]
    assert last["step"] == 2 and last["eval"]["loss"] > 0 and last["eval"]["bits_per_byte"] > 0

    both = run_training(config, overrides=[f"data.valid=[{corpus['valid']}]"])
    assert both.returncode == 2 and "choose one" in both.stderr
