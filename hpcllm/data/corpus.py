"""Corpus sources: which files, and the documents inside each.

A source is a text file (one document), a directory (searched recursively, filtered by extension),
or a JSONL file (one document per line, text in a configurable field). With no source, the default
corpus is the Python standard library's own `.py` files, present wherever Python is.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.errors import UsageError

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")
JSONL_SUFFIXES = (".jsonl",)


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The standard library's .py files, without third-party packages installed beside it."""
    root = default_corpus_root()
    return sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )


def resolve_sources(sources: Sequence[str], extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Expand sources into files, in a fixed order: sources as given, directories sorted.

    A path that does not exist, or a directory with no matching file, is bad input.
    """
    if not sources:
        return default_corpus_files()
    wanted = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in wanted)
            if not found:
                raise UsageError(
                    f"directory {source} holds no files ending in {', '.join(wanted)}; use --ext"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"source {source} does not exist")
    # A file named twice (directly and through its directory) is read once.
    return list(dict.fromkeys(p.resolve() for p in files))


@dataclass
class FileDocuments:
    """The documents of one file, or why it had none."""

    texts: list[str] = field(default_factory=list)
    skipped: str | None = None  # "not_utf8" | "empty" | None
    bad_records: int = 0  # JSONL lines that are not JSON objects with the text field


def read_documents(path: Path, text_field: str = "text") -> FileDocuments:
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return FileDocuments(skipped="not_utf8")
    if path.suffix not in JSONL_SUFFIXES:
        return FileDocuments([raw]) if raw.strip() else FileDocuments(skipped="empty")
    docs = FileDocuments()
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[text_field]
        except (json.JSONDecodeError, TypeError, KeyError):
            docs.bad_records += 1
            continue
        if isinstance(text, str) and text.strip():
            docs.texts.append(text)
        else:
            docs.bad_records += 1
    if not docs.texts and not docs.bad_records:
        docs.skipped = "empty"
    return docs
