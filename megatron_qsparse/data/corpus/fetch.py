"""The three source packages and where their text lies, and the fetch: download, unpack and parse each package
once, then reuse the cached corpus (``fetch_default_corpus``)."""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_qsparse.data.corpus.austen import austen_documents
from megatron_qsparse.data.corpus.debian import (
    download_debian_package,
    package_size,
    package_version,
    read_package_file,
    unpack_deb,
)
from megatron_qsparse.data.corpus.documents import CorpusError, CorpusFiles, Document, Log
from megatron_qsparse.data.corpus.jargon import jargon_documents
from megatron_qsparse.data.corpus.store import load_cached_corpus, write_corpus
from megatron_qsparse.data.corpus.sword import bible_documents
from megatron_qsparse.progress import progress

BIBLE_PACKAGE = "sword-text-web"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
JARGON_PACKAGE = "jargon-text"
BIBLE_MODULE_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
JARGON_TEXT = "usr/share/doc/jargon-text/jargon.txt.gz"


def jargon_documents_from_package(root: Path) -> list[Document]:
    return jargon_documents(gzip.decompress(read_package_file(root / JARGON_TEXT)).decode("utf-8"))


@dataclass(frozen=True)
class _Source:
    name: str
    package: str
    read: Callable[[Path], list[Document]]  # unpacked package root -> documents


SOURCES = (
    _Source("bible", BIBLE_PACKAGE, lambda root: bible_documents(root / BIBLE_MODULE_DIR)),
    _Source("austen", AUSTEN_PACKAGE, lambda root: austen_documents(root / AUSTEN_DATA_DIR)),
    _Source("jargon", JARGON_PACKAGE, jargon_documents_from_package),
)


def _download_sizes() -> dict[str, int] | None:
    """Each source package's download size, or None unless every one is known."""
    sizes = {source.package: package_size(source.package) for source in SOURCES}
    return None if None in sizes.values() else sizes


def build_documents(work_dir: Path, log: Log = print) -> tuple[list[Document], dict[str, str]]:
    """Downloads, unpacks and parses every source package: (documents, package -> Debian version). Progress counts
    the bytes of the packages fetched and parsed when the package lists give their sizes, else the packages."""
    documents, versions = [], {}
    sizes = _download_sizes()
    total, unit = (sum(sizes.values()), "B") if sizes else (len(SOURCES), "package")
    with progress(total=total, desc="corpus packages", unit=unit) as bar:
        for source in SOURCES:
            log(f"{source.name}: apt-get download {source.package}")
            found, versions[source.package] = _read_source(source, work_dir, log)
            log(f"{source.name}: {len(found)} documents, {sum(len(d.text) for d in found):,} characters")
            documents += found
            bar.set_postfix_str(f"{len(documents):,} documents")
            bar.update(sizes[source.package] if sizes else 1)
    return documents, versions


def _read_source(source: _Source, work_dir: Path, log: Log) -> tuple[list[Document], str]:
    """The documents of one source package and its Debian version."""
    deb = download_debian_package(source.package, work_dir, log)
    root = unpack_deb(deb, work_dir / source.package)
    try:
        found = source.read(root)
    except (ValueError, KeyError, IndexError, OSError, zlib.error, lzma.LZMAError, EOFError, struct.error) as error:
        raise CorpusError(f"parsing {source.package} ({deb.name}) failed: {error}") from error
    if not found:
        raise CorpusError(f"parsing {source.package} ({deb.name}) found no documents")
    return found, package_version(deb)


def default_cache_dir() -> Path:
    """``$QSPARSE_CACHE/corpus``, or ``~/.cache/megatron_qsparse/corpus``."""
    root = os.environ.get("QSPARSE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "megatron_qsparse") / "corpus"


def fetch_default_corpus(cache_dir: Path | None = None, log: Log = print) -> CorpusFiles:
    """The default corpus's train and held-out JSON-lines files, built on the first call and cached after it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = load_cached_corpus(cache_dir)
    if cached is not None:
        log(f"default corpus cached in {cache_dir}")
        return cached
    log(f"building the default corpus in {cache_dir}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qsparse-corpus-") as work_dir:
        documents, versions = build_documents(Path(work_dir), log)
    return write_corpus(cache_dir, documents, versions, log)
