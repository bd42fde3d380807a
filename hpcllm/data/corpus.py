"""Corpus sources: which files, the pieces of work they split into, and the documents in each.

A source is a text file (one document), a directory (searched recursively, filtered by extension),
or a JSONL file (one document per line, the text in a named field), plain or compressed
(`.jsonl.gz`, `.jsonl.zst`). With no source, the default corpus is the Python standard library's
own `.py` files, present wherever Python is.

Work is spread by bytes, not files: an uncompressed JSONL file larger than a chunk is cut into
byte ranges, each owning the records that start inside it, so one huge file keeps every rank
busy. The cut depends only on the file's size, never on the number of ranks. Every reader streams:
memory per rank is bounded by a batch of records, whatever the file's size. A document is named by
(file, byte offset of its record), which decides its split without knowing the documents before it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hpcllm.errors import UsageError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", *JSONL_SUFFIXES)
CHUNK_BYTES = 32 << 20  # an uncompressed JSONL file is cut into ranges of this size
BAD_KINDS = ("not_json", "missing_field", "not_utf8")  # what a bad JSONL record can be


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The standard library's .py files, without third-party packages installed beside it (their
    directories are never walked: a large site-packages would cost more than the corpus)."""
    found = []
    for folder, subfolders, names in os.walk(default_corpus_root()):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(found)


def resolve_sources(sources: Sequence[str], extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Expand sources into files, in a fixed order: sources as given, directories sorted.

    A path that does not exist, or a directory with no matching file, is bad input.
    """
    return [path for path, _ in resolve_sources_with_origin(sources, extensions)]


def resolve_sources_with_origin(
    sources: Sequence[str], extensions: Iterable[str] = DEFAULT_EXTENSIONS
) -> list[tuple[Path, int]]:
    """(file, index of the source that named it first), in the order of resolve_sources."""
    if not sources:
        return [(path, 0) for path in default_corpus_files()]
    wanted = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    files: list[tuple[Path, int]] = []
    for origin, source in enumerate(sources):
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(wanted))
            if not found:
                raise UsageError(
                    f"directory {source} holds no files ending in {', '.join(wanted)}; use --ext"
                )
            files += [(p, origin) for p in found]
        elif path.is_file():
            files.append((path, origin))
        else:
            raise UsageError(f"source {source} does not exist")
    # A file named twice (directly and through its directory) is read once, for its first source.
    first: dict[Path, int] = {}
    for path, origin in files:
        first.setdefault(path.resolve(), origin)
    return list(first.items())


def is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


@dataclass(frozen=True)
class Piece:
    """A unit of work: the records of file `file` that start in bytes [start, end) (compressed
    files and text files are one piece, whole)."""

    file: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def pieces(paths: Sequence[Path], chunk: int = CHUNK_BYTES) -> list[Piece]:
    """Every file's pieces, in file order then byte order (the order the output is joined in)."""
    out = []
    for index, path in enumerate(paths):
        size = path.stat().st_size
        splittable = path.name.lower().endswith(".jsonl") and size > chunk
        bounds = list(range(0, size, chunk)) + [size] if splittable else [0, size]
        out += [Piece(index, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    return out


@dataclass
class Documents:
    """What a piece held besides its documents: bad records by kind, or why a text file was skipped."""

    bad: Counter
    skipped: str | None = None  # "not_utf8" | "empty" for a text file


def _open(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _lines(path: Path, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the records that start in the piece's range (all of a compressed file's)."""
    with _open(path) as f:
        position = 0
        if piece.start > 0:  # a line that straddles the start belongs to the piece before
            f.seek(piece.start - 1)
            position = piece.start if f.read(1) == b"\n" else piece.start + len(f.readline())
        whole = not path.name.lower().endswith(".jsonl")
        while whole or position < piece.end:
            line = f.readline()
            if not line:
                return
            yield position, line
            position += len(line)


def read_records(path: Path, piece: Piece, found: Documents) -> Iterator[tuple[int, Any]]:
    """(offset, parsed JSON) of each record of a JSONL piece, streamed; lines that are not UTF-8 or
    not JSON are counted in `found`."""
    for offset, line in _lines(path, piece):
        if not line.strip():
            continue
        try:
            yield offset, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            found.bad["not_utf8"] += 1
        except json.JSONDecodeError:
            found.bad["not_json"] += 1


def read_piece(path: Path, piece: Piece, text_field: str, found: Documents) -> Iterator[tuple[int, str]]:
    """(offset, text) of each document in the piece, streamed; bad records are counted in `found`."""
    if not is_jsonl(path):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            found.skipped = "not_utf8"
            return
        if not text.strip():
            found.skipped = "empty"
            return
        yield 0, text
        return
    for offset, record in read_records(path, piece, found):
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield offset, text
        else:
            found.bad["missing_field"] += 1
