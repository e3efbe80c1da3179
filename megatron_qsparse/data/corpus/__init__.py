"""The embedded default corpus: public-domain English text from three Debian packages.

* ``sword-text-web``: the World English Bible (SWORD zText module, OSIS markup), one document per chapter.
* ``r-cran-janeaustenr``: Jane Austen's six novels (an R lazy-load database), one document per chapter.
* ``jargon-text``: the Jargon File 4.4.7 (plain text), consecutive entries and sections packed into ~8 KB chunks.

Only the Debian package registry is needed (``apt-get download`` + ``dpkg-deb -x``, never ``apt-get install``).
The result is two JSON-lines files, ``train.jsonl`` and ``heldout.jsonl``, one ``{"text", "source"}`` object per
document, cached with a ``manifest.json`` written last::

    python -m megatron_qsparse.data.corpus [--cache-dir DIR]

The modules: ``documents`` (the records and ``CorpusError``), ``sword`` (the Bible), ``rdata`` (R's serialization)
and ``austen`` (the novels), ``jargon`` (the Jargon File), ``text`` (whitespace and paragraphs), ``split`` (the
held-out rule), ``store`` (the files and the cache), ``debian`` (apt-get and dpkg-deb), ``fetch`` (the sources and
the whole build), ``cli`` (the command line). Everything public is importable from here.
"""

from megatron_qsparse.atomic import atomic_file as atomic_write  # the name this package's callers know
from megatron_qsparse.data.corpus.austen import AUSTEN_BOOKS, austen_documents, split_chapters
from megatron_qsparse.data.corpus.cli import main
from megatron_qsparse.data.corpus.debian import download_debian_package, unpack_deb
from megatron_qsparse.data.corpus.documents import CorpusError, CorpusFiles, Document, Log, SplitCounts
from megatron_qsparse.data.corpus.fetch import (
    AUSTEN_DATA_DIR,
    AUSTEN_PACKAGE,
    BIBLE_MODULE_DIR,
    BIBLE_PACKAGE,
    JARGON_PACKAGE,
    JARGON_TEXT,
    SOURCES,
    build_documents,
    default_cache_dir,
    fetch_default_corpus,
    jargon_documents_from_package,
)
from megatron_qsparse.data.corpus.jargon import JARGON_CHUNK_CHARS, JARGON_MAX_CHARS, jargon_documents
from megatron_qsparse.data.corpus.rdata import RSymbol, RVector, read_lazyload_db, unserialize_r
from megatron_qsparse.data.corpus.split import HELDOUT_PER_10000, is_heldout, split_documents
from megatron_qsparse.data.corpus.store import (
    CORPUS_FORMAT,
    iter_documents,
    load_cached_corpus,
    write_corpus,
    write_jsonl,
)
from megatron_qsparse.data.corpus.sword import bible_documents, osis_chapters, osis_to_text, read_ztext_testament
from megatron_qsparse.data.corpus.text import normalize_whitespace, unwrap_paragraphs

__all__ = [
    "AUSTEN_BOOKS",
    "AUSTEN_DATA_DIR",
    "AUSTEN_PACKAGE",
    "BIBLE_MODULE_DIR",
    "BIBLE_PACKAGE",
    "CORPUS_FORMAT",
    "HELDOUT_PER_10000",
    "JARGON_CHUNK_CHARS",
    "JARGON_MAX_CHARS",
    "JARGON_PACKAGE",
    "JARGON_TEXT",
    "SOURCES",
    "CorpusError",
    "CorpusFiles",
    "Document",
    "Log",
    "RSymbol",
    "RVector",
    "SplitCounts",
    "atomic_write",
    "austen_documents",
    "bible_documents",
    "build_documents",
    "default_cache_dir",
    "download_debian_package",
    "fetch_default_corpus",
    "is_heldout",
    "iter_documents",
    "jargon_documents",
    "jargon_documents_from_package",
    "load_cached_corpus",
    "main",
    "normalize_whitespace",
    "osis_chapters",
    "osis_to_text",
    "read_lazyload_db",
    "read_ztext_testament",
    "split_chapters",
    "split_documents",
    "unpack_deb",
    "unserialize_r",
    "unwrap_paragraphs",
    "write_corpus",
    "write_jsonl",
]
