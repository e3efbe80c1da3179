"""lm-evaluation-harness (lm-eval==0.4.13, the "eval" extra) on an HF export of a tiny trained model, offline, with
the local task tests/data/lm_eval/qsparse_mc.yaml: each choice's log-likelihood and the accuracy equal what
tools/evaluate.py computes on the same items (its scoring summed per choice, as the harness's "acc" scores)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from training.conftest import REPO, environment, run_training, write_config

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[eval]' (lm-eval==0.4.13)"
)

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
TASK = "qsparse_mc"
SEQ_LENGTH = 64  # the test model's (training/conftest.py MODEL): every item must fit, or the harness truncates


@pytest.fixture(scope="module")
def export(corpus, tmp_path_factory):
    """A 20-step run of the test model, exported as users export it (its tokenizer travels along)."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = write_config(root / "c.yaml", corpus, root / "run")
    trained = run_training(config)
    assert trained.returncode == 0, trained.stderr[-3000:]
    command = [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(root / "run" / "checkpoints")]
    converted = subprocess.run(
        command + ["--output", str(root / "hf")], cwd=REPO, env=environment(), capture_output=True, text=True
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    return root / "hf"


def evaluate_tool():
    """tools/evaluate.py under a name of its own: `evaluate` is also a package lm-eval installs and imports."""
    spec = importlib.util.spec_from_file_location("tool_evaluate", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_items() -> list:
    """The task's documents as tools/evaluate.py's items: (context, choices, index of the answer)."""
    lines = (TASK_DIR / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()
    return [(d["context"], d["choices"], d["answer"]) for d in map(json.loads, lines)]


def harness_samples(export: Path, monkeypatch) -> tuple:
    """lm-eval's accuracy and per-document samples; batches of 8, so right padding is exercised."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASK_DIR)  # the task's data_files is relative to it, as a user runs it from there
    output = simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},trust_remote_code=True",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        device="cpu",
        batch_size=8,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(output["samples"][TASK], key=lambda sample: sample["doc_id"])
    return output["results"][TASK]["acc,none"], samples


def test_lm_eval_matches_evaluate(export, monkeypatch):
    evaluate = evaluate_tool()
    items = task_items()
    accuracy, samples = harness_samples(export, monkeypatch)
    model, tokenizer = evaluate.load(export)
    assert len(samples) == len(items) == 20

    harness_scores = [[float(ll) for ll, _greedy in sample["filtered_resps"]] for sample in samples]
    ours = [evaluate.choice_log_likelihoods(model, tokenizer, context, choices) for context, choices, _ in items]
    for (context, _choices, _), scores in zip(items, ours):
        context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        assert context_tokens + max(count for _, count in scores) <= SEQ_LENGTH, context
    # Same tokenization of context + choice, same model (the export's own code there, the package's here).
    for item, (harness, mine) in enumerate(zip(harness_scores, ours)):
        assert harness == pytest.approx([total for total, _ in mine], abs=1e-4), item
    harness_picks = [max(range(len(s)), key=s.__getitem__) for s in harness_scores]
    our_picks = [max(range(len(s)), key=lambda i, s=s: s[i][0]) for s in ours]
    assert harness_picks == our_picks
    assert [sample["acc"] for sample in samples] == [
        float(pick == answer) for pick, (*_, answer) in zip(our_picks, items)
    ]
    assert accuracy == evaluate.choice_accuracy(model, tokenizer, items, per_token=False)
