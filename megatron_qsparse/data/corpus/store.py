"""The corpus on disk: ``train.jsonl`` and ``heldout.jsonl`` (one ``{"text", "source"}`` object per line) and,
written last, ``manifest.json`` with each file's size and sha256, which tells whether a cache can be reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron_qsparse.atomic import atomic_file, write_text
from megatron_qsparse.data.corpus.documents import CorpusError, CorpusFiles, Document, Log, SplitCounts
from megatron_qsparse.data.corpus.split import HELDOUT_PER_10000, split_documents
from megatron_qsparse.progress import progress

# Bump when the extraction changes: caches written by an older format are rebuilt.
CORPUS_FORMAT = 1


def write_jsonl(path: Path, documents: Iterable[Document], bar=None) -> SplitCounts:
    """Writes the documents, one JSON object a line; ``bar`` (a ``progress`` display) advances one per document."""
    count = characters = 0
    with atomic_file(path) as stream:
        for document in documents:
            stream.write(json.dumps({"text": document.text, "source": document.source}, ensure_ascii=False) + "\n")
            count += 1
            characters += len(document.text)
            if bar is not None:
                bar.update(1)
    return SplitCounts(count, characters)


def iter_documents(path: Path) -> Iterator[Document]:
    """The documents of a JSON-lines corpus file."""
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            record = json.loads(line)
            yield Document(record["source"], record["text"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_name(document: Document) -> str:
    return document.source.split("/", 1)[0]


def _count_by_source(train: list[Document], heldout: list[Document]) -> dict[str, dict[str, SplitCounts]]:
    counts: dict[str, dict[str, list[int]]] = {}
    for split, documents in (("train", train), ("heldout", heldout)):
        for document in documents:
            by_split = counts.setdefault(_source_name(document), {"train": [0, 0], "heldout": [0, 0]})
            by_split[split][0] += 1
            by_split[split][1] += len(document.text)
    return {source: {split: SplitCounts(*c) for split, c in s.items()} for source, s in counts.items()}


def write_corpus(
    cache_dir: Path, documents: Iterable[Document], packages: dict[str, str] | None = None, log: Log = print
) -> CorpusFiles:
    """Splits ``documents`` and writes ``train.jsonl``, ``heldout.jsonl`` and, last, ``manifest.json``."""
    train, heldout = split_documents(documents)
    if not train or not heldout:
        raise CorpusError(f"the held-out split left {len(train)} train and {len(heldout)} held-out documents")
    paths = {"train": cache_dir / "train.jsonl", "heldout": cache_dir / "heldout.jsonl"}
    files = {}
    with progress(total=len(train) + len(heldout), desc="writing the corpus", unit="doc") as bar:
        for split, members in (("train", train), ("heldout", heldout)):
            files[split] = _write_split(paths[split], members, bar, log)
    manifest = {
        "format": CORPUS_FORMAT,
        "packages": packages or {},
        "heldout_rule": f"sha256(source)[:8] as big-endian integer mod 10000 < {HELDOUT_PER_10000}",
        "files": files,
        "sources": {
            source: {split: vars(c) for split, c in by_split.items()}
            for source, by_split in _count_by_source(train, heldout).items()
        },
    }
    write_text(cache_dir / "manifest.json", json.dumps(manifest, indent=2))
    return _corpus_files(cache_dir, manifest)


def _write_split(path: Path, members: list[Document], bar, log: Log) -> dict:
    """Writes one split's file; its manifest entry."""
    counts = write_jsonl(path, members, bar)
    log(f"wrote {path} ({counts.documents} documents, {counts.characters:,} characters)")
    return {
        "path": path.name,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "documents": counts.documents,
        "characters": counts.characters,
    }


def _corpus_files(cache_dir: Path, manifest: dict) -> CorpusFiles:
    files = manifest["files"]
    return CorpusFiles(
        train=cache_dir / files["train"]["path"],
        heldout=cache_dir / files["heldout"]["path"],
        manifest=cache_dir / "manifest.json",
        train_counts=SplitCounts(files["train"]["documents"], files["train"]["characters"]),
        heldout_counts=SplitCounts(files["heldout"]["documents"], files["heldout"]["characters"]),
        source_counts={
            source: {split: SplitCounts(**c) for split, c in by_split.items()}
            for source, by_split in manifest["sources"].items()
        },
    )


def load_cached_corpus(cache_dir: Path) -> CorpusFiles | None:
    """The corpus in ``cache_dir`` if its manifest is current and every file matches its size and sha256."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != CORPUS_FORMAT:
            return None
        for entry in manifest["files"].values():
            path = cache_dir / entry["path"]
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                return None
        return _corpus_files(cache_dir, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None
