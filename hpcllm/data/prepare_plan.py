"""What `hpcllm prepare` is asked and what it will do: its options, checked; the plan of pieces
(files, or byte ranges of a large JSONL file) with the staging directory; and each piece's
statistics as tokenizing it found them. Shared by the tokenizing half (prepare.py) and the
writing half (prepare_write.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import SPLITS
from hpcllm.errors import UsageError


@dataclass
class PrepareOptions:
    sources: list[str]
    out: Path
    tokenizer: str = "bpe"
    vocab_size: int = tok.DEFAULT_VOCAB_SIZE
    val_ratio: float = 0.05
    seed: int = 0
    text_field: str = "text"
    extensions: tuple[str, ...] = corpus.DEFAULT_EXTENSIONS
    dtype: str = "auto"
    force: bool = False
    bpe_sample_bytes: int = 0  # 0: SAMPLE_BYTES_PER_TOKEN per vocabulary entry
    chunk_bytes: int = corpus.CHUNK_BYTES  # a larger uncompressed JSONL file is cut into ranges


@dataclass
class Plan:
    files: list[str]
    origins: list[int]  # the index of the source that named each file
    pieces: list[corpus.Piece]
    staging: str


@dataclass
class PieceStats:
    index: int  # of the piece
    file: int
    bytes: int
    rank: int  # that tokenized it: its tokens are in this rank's spool files
    start: dict[str, int]  # per split, where its tokens begin in that spool (bytes)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: str | None = None  # a text file's: not_utf8 | empty
    bad: dict[str, int] = field(default_factory=dict)  # JSONL records by what was wrong


def check_options(opts: PrepareOptions) -> None:
    try:
        given = tok.given_file(opts.tokenizer)
    except ValueError as exc:
        raise UsageError(f"{exc}; {opts.tokenizer} is none of these") from exc
    if given is not None:
        try:
            tok.eot_id(tok.load(given))
        except Exception as exc:  # the tokenizers library raises its own untyped errors
            raise UsageError(f"--tokenizer {given}: not a usable tokenizer.json ({exc})") from exc
    if opts.tokenizer == "bpe" and not 257 <= opts.vocab_size <= 1 << 22:
        raise UsageError(
            f"--vocab-size {opts.vocab_size} is out of range: a byte-level BPE needs 257..4194304"
        )
    if opts.bpe_sample_bytes < 0:
        raise UsageError(f"--bpe-sample-mb must not be negative, not {opts.bpe_sample_bytes / (1 << 20):g}")
    if opts.chunk_bytes < 1:
        raise UsageError(f"--chunk-mb must be positive, not {opts.chunk_bytes / (1 << 20):g}")
    if not 0 < opts.val_ratio < 1:
        raise UsageError(f"--val-ratio must be between 0 and 1 (exclusive), not {opts.val_ratio}")


def plan_pieces(opts: PrepareOptions) -> Plan:
    """Rank 0: the options checked, the sources resolved and cut into pieces, the staging directory named."""
    check_options(opts)
    out = opts.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise UsageError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    found = corpus.resolve_sources_with_origin(opts.sources, opts.extensions)
    if not found:
        raise UsageError("no corpus files found; name text files, directories or JSONL files as sources")
    files = [path for path, _ in found]
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    pieces = corpus.pieces(files, opts.chunk_bytes)
    return Plan([str(f) for f in files], [o for _, o in found], pieces, str(staging))


def spool_dir(staging: Path) -> Path:
    return staging / "spool"


def spool_path(staging: Path, rank: int, split: str) -> Path:
    """A rank's tokens of one split, piece after piece: one file per rank, not one per piece, because
    creating thousands of small files is slow everywhere and a parallel file system's metadata
    server serialises them."""
    return spool_dir(staging) / f"rank{rank:05d}.{split}.bin"
