"""R's XDR serialization (``serialize(x, NULL, xdr = TRUE)``) and lazy-load databases (``.rdb``/``.rdx``): just
enough of R to read the character vectors of an R data package."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any


class RVector(list):
    """An R vector (logical, integer, double, character, list): its elements, plus its attributes."""

    def __init__(self, values: Iterable[Any] = (), attributes: dict[str, Any] | None = None):
        super().__init__(values)
        self.attributes = attributes or {}

    def named(self) -> dict[str, Any]:
        """The elements keyed by the ``names`` attribute."""
        names = self.attributes.get("names")
        if names is None or len(names) != len(self):
            raise ValueError("R vector has no names attribute of its length")
        return dict(zip(names, self))


class RSymbol(str):
    """An R symbol (SYMSXP), e.g. an attribute tag."""


_NILVALUE_SXP, _REFSXP = 254, 255
_SYMSXP, _LISTSXP, _CHARSXP = 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_HAS_ATTRIBUTES, _HAS_TAG = 1 << 9, 1 << 10
_CHARSXP_LATIN1, _CHARSXP_UTF8 = 1 << 2, 1 << 3
_NA_INTEGER = -(2**31)


class _XdrReader:
    """Reads R's XDR serialization (``serialize(x, NULL, xdr = TRUE)``, versions 2 and 3); see R's serialize.c.

    Every item starts with a 32-bit flags word: bits 0-7 the type, bit 9 "has attributes", bit 10 "has tag",
    bits 12-27 the "levels" (string encoding for CHARSXP). Symbols are entered in a reference table that later
    REFSXP items point back to (1-based index in the upper 24 bits of the flags, or in the next word when 0).
    """

    def __init__(self, data: bytes):
        self.data, self.position = data, 0
        self.references: list[RSymbol] = []
        self.native_encoding = "utf-8"

    def take(self, size: int) -> bytes:
        if size < 0 or self.position + size > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.position} (wanted {size} more)")
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk

    def integer(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        length = self.integer()
        if length == -1:  # long vector: the length follows as two words
            upper, lower = struct.unpack(">II", self.take(8))
            return (upper << 32) + lower
        return length

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("not an R XDR serialization (header is not 'X\\n')")
        version = self.integer()
        self.take(8)  # R version that wrote it, oldest R version that can read it
        if version == 3:
            self.native_encoding = self.take(self.integer()).decode("ascii")
        elif version != 2:
            raise ValueError(f"R serialization format version {version} is not supported (only 2 and 3)")

    def item(self) -> Any:
        flags = self.integer()
        kind = flags & 0xFF
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.integer()
            return self.references[index - 1]
        if kind == _SYMSXP:
            symbol = RSymbol(self.item())
            self.references.append(symbol)
            return symbol
        if kind == _LISTSXP:
            return self.pairlist(flags)
        if kind == _CHARSXP:
            return self.string(flags)
        if kind in _VECTOR_READERS:
            values = _VECTOR_READERS[kind](self, self.length())
            attributes = self.attributes() if flags & _HAS_ATTRIBUTES else {}
            return RVector(values, attributes)
        raise ValueError(f"R object type {kind} at byte {self.position - 4} is not supported by this reader")

    def attributes(self) -> dict[str, Any]:
        return dict(self.item())

    def pairlist(self, flags: int) -> list[tuple[str | None, Any]]:
        """A pairlist as (tag, value) pairs; read iteratively since R writes the CDR chain inline."""
        pairs = []
        while (flags & 0xFF) == _LISTSXP:
            if flags & _HAS_ATTRIBUTES:
                self.item()  # attributes on a pairlist node carry nothing the corpus needs
            tag = str(self.item()) if flags & _HAS_TAG else None
            pairs.append((tag, self.item()))
            flags = self.integer()
        if (flags & 0xFF) != _NILVALUE_SXP:
            raise ValueError(f"pairlist ends in type {flags & 0xFF}, not NULL")
        return pairs

    def string(self, flags: int) -> str | None:
        length = self.integer()
        if length == -1:
            return None  # NA_character_
        levels = flags >> 12
        encoding = "latin-1" if levels & _CHARSXP_LATIN1 else "utf-8" if levels & _CHARSXP_UTF8 else None
        return self.take(length).decode(encoding or self.native_encoding)

    def strings(self, count: int) -> list[str | None]:
        return [self.item() for _ in range(count)]

    def items(self, count: int) -> list[Any]:
        return [self.item() for _ in range(count)]

    def integers(self, count: int) -> list[int | None]:
        return [None if v == _NA_INTEGER else v for v in struct.unpack(f">{count}i", self.take(4 * count))]

    def logicals(self, count: int) -> list[bool | None]:
        return [None if v is None else bool(v) for v in self.integers(count)]

    def doubles(self, count: int) -> list[float]:
        return list(struct.unpack(f">{count}d", self.take(8 * count)))


_VECTOR_READERS: dict[int, Callable[[_XdrReader, int], list]] = {
    _LGLSXP: _XdrReader.logicals,
    _INTSXP: _XdrReader.integers,
    _REALSXP: _XdrReader.doubles,
    _STRSXP: _XdrReader.strings,
    _VECSXP: _XdrReader.items,
    _EXPRSXP: _XdrReader.items,
}


def unserialize_r(data: bytes) -> Any:
    """The R object in an XDR serialization: vectors as ``RVector``, NULL as None, NA as None, pairlists as
    (tag, value) lists. Environments, closures, ALTREP and other types raise ValueError."""
    reader = _XdrReader(data)
    reader.header()
    value = reader.item()
    if reader.position != len(data):
        raise ValueError(f"{len(data) - reader.position} bytes left after the R object")
    return value


def _inflate_lazyload_blob(blob: bytes, compression: bool | int) -> bytes:
    """One object of a lazy-load database: 4-byte big-endian inflated size, then zlib data (compression TRUE) or
    a type byte ('Z' xz, '2' bzip2, '0' none) and the data (compression 2 or 3)."""
    size = int.from_bytes(blob[:4], "big")
    if compression is True or compression == 1:
        data = zlib.decompress(blob[4:])
    else:
        inflate = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}.get(blob[4:5])
        if inflate is None:
            raise ValueError(f"unknown lazy-load compression type byte {blob[4:5]!r}")
        data = inflate(blob[5:])
    if len(data) != size:
        raise ValueError(f"lazy-load object inflates to {len(data)} bytes, its header says {size}")
    return data


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, Any]:
    """Every variable of an R lazy-load database (``.rdb`` data, ``.rdx`` gzip-compressed serialized index with
    ``variables`` = name -> (offset, length) in the ``.rdb`` and ``compressed`` = TRUE, 2 or 3)."""
    index = unserialize_r(gzip.decompress(rdx)).named()
    compression = index["compressed"][0]
    variables = {}
    for name, (offset, length) in index["variables"].named().items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        variables[name] = unserialize_r(_inflate_lazyload_blob(blob, compression))
    return variables
