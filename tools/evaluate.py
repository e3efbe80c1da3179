"""Evaluate a Hugging Face export offline: held-out loss and bits per byte, a multiple-choice continuation task
built deterministically from held-out text, and the realized sparsity per site with the activated parameters N_a
measured on that text. One table, or ``--json``.

    .venv/bin/python tools/evaluate.py --model exports/tiny-cpu [--data heldout.jsonl] [--json]

Without ``--data`` it uses the held-out split of the default corpus (fetched and cached on first use).
Multiple choice: for each passage, the context is its first words and the right answer its next words; the
three distractors are the same-length continuations of other passages. A choice's score is the mean log-probability
of its tokens given the context; chance is 25%.

Exit status (one line on stderr naming the path): 2 bad usage, 65 a ``--data`` line that is not a JSON object
with a "text" string, or an export without a tokenizer, 66 ``--model`` (its config.json) or ``--data`` does not
exist, 74 the default corpus could not be fetched (no ``--data``).
"""

import argparse
import errno
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_qsparse.errors import EXIT_IO, DataError, UserError, os_error, run_command  # noqa: E402
from megatron_qsparse.progress import progress  # noqa: E402


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_qsparse.hf  # noqa: F401  (registers the qsparse model type)
    from megatron_qsparse.data.tokenizer import TOKENIZER_FILES

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(
            f"{model_dir}: the export has no tokenizer ({', '.join(TOKENIZER_FILES)}); export it again with "
            "tools/convert_to_hf.py --tokenizer DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


def check_export(model: Path) -> None:
    """An export is a directory with a config.json: a missing one is named before anything loads."""
    if model.exists() and not model.is_dir():
        raise os_error(errno.ENOTDIR, model)
    if not (model / "config.json").is_file():
        raise os_error(errno.ENOENT, model / "config.json")


class CorpusUnavailable(UserError):
    exit_code = EXIT_IO


def default_heldout() -> Path:
    from megatron_qsparse.data.corpus import CorpusError, fetch_default_corpus

    try:
        return fetch_default_corpus(log=lambda m: None).heldout
    except CorpusError as err:
        raise CorpusUnavailable(f"the default corpus could not be built: {err}; or pass --data FILE") from None


def documents(path: Path, limit: int):
    texts = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if len(texts) == limit:
                break
            if line.strip():
                texts.append(_text_of(line, path, number))
    return texts


def _text_of(line: str, path: Path, number: int) -> str:
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise DataError(f'{path}:{number}: expected a JSON object with a "text" string')
    return text


def with_progress(items, desc: str, unit: str):
    """``items`` one by one, with a progress display (stderr) over their number."""
    items = list(items)
    with progress(total=len(items), desc=desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def heldout_loss(model, tokenizer, texts, seq_length: int):
    nll, tokens, text_bytes = 0.0, 0, 0
    for text in with_progress(texts, "held-out loss", "doc"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        text_bytes += len(text.encode("utf-8"))
        for start in range(0, max(len(ids) - 1, 0), seq_length):
            window = torch.tensor(ids[start : start + seq_length + 1])[None]
            if window.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = model(window[:, :-1]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
            tokens += window.shape[1] - 1
    return nll / tokens, nll / math.log(2) / text_bytes, tokens


def choice_items(texts, context_words: int = 24, answer_words: int = 8, count: int = 40, seed: int = 0):
    passages = []
    for text in texts:
        words = text.split()
        for start in range(0, len(words) - context_words - answer_words, context_words + answer_words):
            passages.append(
                (
                    " ".join(words[start : start + context_words]),
                    " " + " ".join(words[start + context_words : start + context_words + answer_words]),
                )
            )
    rng = random.Random(seed)
    rng.shuffle(passages)
    passages = passages[:count]
    items = []
    for i, (context, answer) in enumerate(passages):
        others = [passages[(i + j) % len(passages)][1] for j in (1, 2, 3)]
        choices = [answer] + others
        rng.shuffle(choices)
        items.append((context, choices, choices.index(answer)))
    return items


def choice_log_likelihoods(model, tokenizer, context: str, choices) -> list:
    """Each choice's (summed log-probability of its tokens given the context, its number of tokens)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in choices:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ctx + cont)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
        picked = logp[len(ctx) - 1 :, :].gather(-1, ids[0, len(ctx) :, None])
        scores.append((float(picked.sum()), len(cont)))
    return scores


def choice_accuracy(model, tokenizer, items, per_token: bool = True) -> float:
    """The share of items whose best-scored choice is the answer. A choice's score is the mean log-probability of
    its tokens (``per_token``, the table's), or their sum: lm-evaluation-harness's "acc" for the same items."""
    correct = 0
    for context, choices, answer in with_progress(items, "multiple choice", "item"):
        scores = [
            total / count if per_token else total
            for total, count in choice_log_likelihoods(model, tokenizer, context, choices)
        ]
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return correct / max(len(items), 1)


def measured_sparsity(model):
    """Realized input sparsity per site (recorded during the evaluation) and N_a from it."""
    from megatron_qsparse.hf.modeling_qsparse import SiteLinear

    site_of = {"qkv_proj": "qkv", "o_proj": "proj", "gate_up_proj": "fc1", "down_proj": "fc2"}
    zeros, entries, weights, active = {}, {}, 0, 0.0
    experts = model.config.num_experts or 0
    for name, module in model.named_modules():
        if isinstance(module, SiteLinear) and module.entries:
            site = site_of[name.rsplit(".", 1)[-1]]
            zeros[site] = zeros.get(site, 0) + module.zeros
            entries[site] = entries.get(site, 0) + module.entries
            share = model.config.num_experts_per_tok / experts if ".experts." in name else 1.0
            weights += module.weight.numel()
            active += (1 - module.zeros / module.entries) * module.weight.numel() * share
    return {s: zeros[s] / entries[s] for s in zeros}, weights, active


def main(argv=None) -> int:
    return run_command(_main, argv, "evaluate.py")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", type=Path, help="held-out JSON lines with a 'text' field")
    parser.add_argument("--max-docs", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--choices", type=int, default=40, help="number of multiple-choice items")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    check_export(args.model)
    if args.data is None:
        args.data = default_heldout()
    texts = documents(args.data, args.max_docs)  # a bad --data fails before the model loads
    if not texts:
        raise DataError(f'{args.data}: no documents (JSON lines with a "text" field)')
    model, tokenizer = load(args.model)
    for module in model.modules():
        if hasattr(module, "record"):
            module.record = True
    loss, bpb, tokens = heldout_loss(model, tokenizer, texts, args.seq_length)
    sparsity, n_block, n_active = measured_sparsity(model)
    accuracy = choice_accuracy(model, tokenizer, choice_items(texts, count=args.choices))
    result = {
        "model": str(args.model),
        "data": str(args.data),
        "documents": len(texts),
        "tokens": tokens,
        "heldout_loss": loss,
        "bits_per_byte": bpb,
        "multiple_choice_accuracy": accuracy,
        "multiple_choice_chance": 0.25,
        "realized_sparsity": sparsity,
        "block_linear_parameters_N": n_block,
        "activated_parameters_N_a": n_active,
        "configured_sparsity": model.config.sparsity,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{'model':<28}{args.model}")
        print(f"{'held-out loss':<28}{loss:.4f} nats/token over {tokens} tokens ({len(texts)} documents)")
        print(f"{'bits per byte':<28}{bpb:.4f}")
        print(f"{'multiple choice accuracy':<28}{100 * accuracy:.1f}% (chance 25%, {args.choices} items)")
        print(f"{'realized sparsity':<28}" + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sparsity.items()))
        print(f"{'N / N_a (measured)':<28}{n_block / 1e6:.3f}M / {n_active / 1e6:.3f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
