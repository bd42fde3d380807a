"""What `hpcllm prepare` is asked and what it will do: its options, checked; the plan of pieces
(files, or byte ranges of a large JSONL file) with the staging directory; and each piece's
statistics as tokenizing it found them. Shared by the tokenizing half (prepare.py) and the
writing half (prepare_write.py).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.data import chat, corpus, sft
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import SIDE_FILES, SPLITS
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
    format: str = "text"  # text: documents for pretraining; sft: fine-tuning samples (data/sft.py)
    train_on: str = "assistant"  # sft: which tokens train (sft.TRAIN_ON)
    chat_template: str | None = None  # sft: a Jinja2 file instead of the tokenizer's own template
    too_long: str = "truncate"  # sft: a sample over max_tokens is cut or dropped (sft.TOO_LONG)
    max_tokens: int = sft.DEFAULT_MAX_TOKENS
    fields: sft.SftFields = field(default_factory=sft.SftFields)

    @property
    def tokenizer_folder(self) -> Path | None:
        """The folder of a given tokenizer (where its chat template would be); None for bpe, byte."""
        given = tok.given_file(self.tokenizer)
        return None if given is None else given.parent

    @property
    def streams(self) -> list[str]:
        """The binaries written per split: tokens, and a fine-tuning split's mask and lengths."""
        extra = [f"{split}.{what}" for what in SIDE_FILES for split in SPLITS] if self.format == "sft" else []
        return [*SPLITS, *extra]


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
    start: dict[str, int]  # per stream (PrepareOptions.streams), where its part begins in that spool (bytes)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # sft: samples
    trained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # sft: trained tokens
    truncated: int = 0  # sft: samples cut to max_tokens
    skipped: str | None = None  # a text file's: not_utf8 | empty
    bad: dict[str, int] = field(default_factory=dict)  # JSONL records by what was wrong


def in_val(seed: int, file_index: int, doc_index: int, val_ratio: float) -> bool:
    """A document's split, from a hash: independent of which rank reads it, or when."""
    digest = hashlib.blake2b(f"{seed}:{file_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_ratio


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
    if opts.format == "sft":
        _check_sft_options(opts)
    elif opts.format != "text":
        raise UsageError(f"--format takes text or sft, not {opts.format}")


def _check_sft_options(opts: PrepareOptions) -> None:
    if opts.tokenizer == "bpe":
        raise UsageError(
            "--format sft needs the tokenizer of the model to fine-tune: pass --tokenizer DIR (its "
            "prepared data, or a Hugging Face folder)"
        )
    choices = {"--train-on": (opts.train_on, sft.TRAIN_ON), "--too-long": (opts.too_long, sft.TOO_LONG)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UsageError(f"{flag} takes {' | '.join(allowed)}, not {value}")
    if opts.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (a token and its target), not {opts.max_tokens}")
    # The template is found and parsed here, before anything is written.
    text, _ = chat.template_of(opts.tokenizer_folder, opts.chat_template)
    _ = chat.ChatTemplate(text, "", "").compiled


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
    if opts.format == "sft" and not all(corpus.is_jsonl(path) for path in files):
        name = next(path for path in files if not corpus.is_jsonl(path))
        raise UsageError(f"--format sft reads JSONL records; {name} is not .jsonl, .jsonl.gz or .jsonl.zst")
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    pieces = corpus.pieces(files, opts.chunk_bytes)
    return Plan([str(f) for f in files], [o for _, o in found], pieces, str(staging))


def spool_dir(staging: Path) -> Path:
    return staging / "spool"


def spool_path(staging: Path, rank: int, stream: str) -> Path:
    """A rank's tokens of one split, piece after piece: one file per rank, not one per piece, because
    creating thousands of small files is slow everywhere and a parallel file system's metadata
    server serialises them."""
    return spool_dir(staging) / f"rank{rank:05d}.{stream}.bin"
