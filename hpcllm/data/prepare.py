"""`hpcllm prepare`: corpus → tokenizer → token files + manifest, spread over all ranks.

1. Rank 0 resolves the sources and checks `--out` (every rank gets the plan or the same error).
2. Rank 0 trains the BPE on a sample of the corpus (documents in order); the tokenizer is broadcast.
3. Every rank tokenizes pieces (whole files, or byte ranges of a large JSONL file: corpus.pieces)
   drawn from a shared work queue (largest first, `tasks.dynamic_map`), streaming their records
   in batches, and writes each piece's train and val tokens to a part file named by the piece.
4. Rank 0 concatenates the parts in piece order, writes the manifest and renames the staging
   directory to `--out`.

Each document's split is a hash of (seed, file index, byte offset of its record), and the parts are
joined in piece order, so the output is byte-identical whatever the number of ranks. Nothing appears at
`--out` until it is complete; an interrupted prepare leaves only a hidden `.NAME.tmp-*` directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import hpcllm
from hpcllm.cluster.runtime import root_decides
from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    choose_dtype,
    sha256_of,
    unigram_loss,
)
from hpcllm.errors import UsageError
from hpcllm.parallel.tasks import SharedCounters, dynamic_map, largest_first


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
    bpe_sample_bytes: int = 16 << 20
    chunk_bytes: int = corpus.CHUNK_BYTES  # a larger uncompressed JSONL file is cut into ranges


BATCH_BYTES = 4 << 20  # text tokenized per encode_batch call: bounds a rank's memory


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
            raise UsageError(
                f"--tokenizer {given}: not a usable tokenizer.json with {tok.EOT} ({exc})"
            ) from exc
    if opts.tokenizer == "bpe" and not 257 <= opts.vocab_size <= 1 << 22:
        raise UsageError(
            f"--vocab-size {opts.vocab_size} is out of range: a byte-level BPE needs 257..4194304"
        )
    if opts.chunk_bytes < 1:
        raise UsageError(f"--chunk-mb must be positive, not {opts.chunk_bytes / (1 << 20):g}")
    if not 0 < opts.val_ratio < 1:
        raise UsageError(f"--val-ratio must be between 0 and 1 (exclusive), not {opts.val_ratio}")


def _plan(opts: PrepareOptions) -> Plan:
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


def _train_tokenizer(opts: PrepareOptions, files: list[str]) -> str:
    if opts.tokenizer == "byte":
        return tok.byte_tokenizer().to_str()
    given = tok.given_file(opts.tokenizer)
    if given is not None:
        return tok.load(given).to_str()

    def sample() -> Any:
        """The corpus's first documents, in file order, up to the sample size: deterministic."""
        taken = 0
        for name in files:
            path = Path(name)
            whole = corpus.Piece(0, 0, path.stat().st_size)
            for _, text in corpus.read_piece(path, whole, opts.text_field, corpus.Documents(Counter())):
                yield text
                taken += len(text)
                if taken >= opts.bpe_sample_bytes:
                    return

    return tok.train_bpe(sample(), opts.vocab_size).to_str()


def in_val(seed: int, file_index: int, doc_index: int, val_ratio: float) -> bool:
    """A document's split, from a hash: independent of which rank reads it, or when."""
    digest = hashlib.blake2b(f"{seed}:{file_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_ratio


def part_path(staging: Path, index: int, split: str) -> Path:
    return staging / "parts" / f"{index:08d}.{split}.bin"


def _tokenize_piece(
    index: int, plan: Plan, opts: PrepareOptions, tokenizer: Any, dtype: np.dtype, staging: Path
) -> PieceStats:
    """Tokenize one piece, streaming its documents in batches into its train and val part files."""
    piece = plan.pieces[index]
    stats = PieceStats(index, piece.file, piece.size)
    found = corpus.Documents(Counter())
    eot = np.array([tok.eot_id(tokenizer)], dtype=dtype)
    outputs = {split: open(part_path(staging, index, split), "wb") for split in SPLITS}  # noqa: SIM115
    try:
        batch: list[tuple[int, str]] = []
        size = 0

        def flush() -> None:
            for (offset, _), encoding in zip(
                batch, tokenizer.encode_batch([t for _, t in batch]), strict=True
            ):
                split = "val" if in_val(opts.seed, piece.file, offset, opts.val_ratio) else "train"
                ids = np.asarray(encoding.ids, dtype=dtype)
                outputs[split].write(ids.tobytes() + eot.tobytes())
                stats.tokens[split] += ids.size + 1
                stats.documents[split] += 1
            batch.clear()

        for offset, text in corpus.read_piece(Path(plan.files[piece.file]), piece, opts.text_field, found):
            batch.append((offset, text))
            size += len(text)
            if size >= BATCH_BYTES:
                flush()
                size = 0
        flush()
    finally:
        for f in outputs.values():
            f.close()
    stats.skipped, stats.bad = found.skipped, dict(found.bad)
    return stats


def _assemble(
    opts: PrepareOptions, plan: Plan, stats: list[PieceStats], tokenizer: Any, dtype: np.dtype
) -> dict[str, Any]:
    """Join the parts in piece order, write tokenizer and manifest, and move the result into place."""
    staging = Path(plan.staging)
    stats.sort(key=lambda s: s.index)
    skipped = Counter(s.skipped for s in stats if s.skipped)
    documents = {split: sum(s.documents[split] for s in stats) for split in SPLITS}
    if not sum(documents.values()):
        shutil.rmtree(staging, ignore_errors=True)
        detail = ", ".join(f"{n} {why.replace('_', '-')}" for why, n in skipped.items()) or "no text"
        bad = sum(n for st in stats for n in st.bad.values())
        detail += f", {bad} bad JSONL records" if bad else ""
        raise UsageError(
            f"the corpus has no documents ({len(plan.files)} files: {detail}); check the sources"
        )
    for split in SPLITS:
        with open(staging / f"{split}.bin", "wb") as out:
            for s in stats:
                part = part_path(staging, s.index, split)
                if part.exists():
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out)
    split_kind = "documents"
    tokens = {split: (staging / f"{split}.bin").stat().st_size // dtype.itemsize for split in SPLITS}
    if not tokens["train"] or not tokens["val"]:
        # Too few documents for a document split (one big text file, say): cut the stream instead.
        split_kind = "tokens"
        stream = np.concatenate([np.fromfile(staging / f"{split}.bin", dtype=dtype) for split in SPLITS])
        if stream.size < 2:
            shutil.rmtree(staging, ignore_errors=True)
            raise UsageError(f"the corpus has only {stream.size} token(s); give it more text")
        cut = min(stream.size - 1, max(1, int(round(stream.size * (1 - opts.val_ratio)))))
        stream[:cut].tofile(staging / "train.bin")
        stream[cut:].tofile(staging / "val.bin")
        tokens = {"train": cut, "val": int(stream.size - cut)}
    shutil.rmtree(staging / "parts")
    tokenizer.save(str(staging / TOKENIZER))
    manifest = _manifest(opts, plan, stats, tokenizer, dtype, (split_kind, tokens, documents))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _move_into_place(staging, opts.out)
    return manifest


def _manifest(
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    tokenizer: Any,
    dtype: np.dtype,
    counts: tuple[str, dict[str, int], dict[str, int]],  # how the split was cut, tokens, documents
) -> dict[str, Any]:
    staging = Path(plan.staging)
    split_kind, tokens, documents = counts
    skipped = Counter(s.skipped for s in stats if s.skipped)
    vocab, eot = tokenizer.get_vocab_size(), tok.eot_id(tokenizer)
    train, val = (np.memmap(staging / f"{split}.bin", dtype=dtype, mode="r") for split in ("train", "val"))
    not_utf8 = [plan.files[s.file] for s in stats if s.skipped == "not_utf8"]
    bad = {kind: sum(s.bad.get(kind, 0) for s in stats) for kind in corpus.BAD_KINDS}
    return {
        "format": FORMAT_VERSION,
        "created_by": f"hpcllm {hpcllm.__version__}",
        "tokenizer": {"kind": opts.tokenizer, "vocab_size": vocab, "eot_id": eot, "file": TOKENIZER},
        "dtype": dtype.name,
        "seed": opts.seed,
        "val_ratio": opts.val_ratio,
        "split_by": split_kind,
        # Measured once here, so that a training start needs no pass over the data.
        "unigram_loss": unigram_loss(train, val, vocab),
        "splits": {
            split: {
                "file": f"{split}.bin",
                "tokens": int(tokens[split]),
                "documents": documents[split],
                "sha256": sha256_of(staging / f"{split}.bin"),
            }
            for split in SPLITS
        },
        "sources": [str(Path(s).resolve()) for s in opts.sources]
        or [f"default: {corpus.default_corpus_root()}/**/*.py"],
        "files": {
            "read": len(plan.files),
            "pieces": len(plan.pieces),
            "skipped_not_utf8": skipped["not_utf8"],
            "skipped_empty": skipped["empty"],
            "bad_jsonl_records": sum(bad.values()),
            "bad_jsonl_by_kind": bad,
            "not_utf8": not_utf8,
        },
        "per_source": _per_source(opts, plan, stats),
    }


def _per_source(opts: PrepareOptions, plan: Plan, stats: list[PieceStats]) -> list[dict[str, Any]]:
    """Files, bytes, documents and tokens of each source as given (a mixture's weights refer to them)."""
    names = [str(Path(s).resolve()) for s in opts.sources] or ["default corpus"]
    rows = [{"source": name, "files": 0, "bytes": 0, "documents": 0, "tokens": 0} for name in names]
    for origin in plan.origins:
        rows[origin]["files"] += 1
    for s in stats:
        row = rows[plan.origins[s.file]]
        row["bytes"] += s.bytes
        row["documents"] += sum(s.documents.values())
        row["tokens"] += sum(s.tokens.values())
    return rows


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to `out`; an old `out` (with --force) goes only after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


@dataclass
class Summary:
    manifest: dict[str, Any]
    seconds: float
    ranks: int

    def lines(self) -> list[str]:
        m = self.manifest
        train, val = m["splits"]["train"], m["splits"]["val"]
        total = train["tokens"] + val["tokens"]
        files = m["files"]
        skipped = files["skipped_not_utf8"] + files["skipped_empty"]
        bad = ", ".join(
            f"{n} {kind.replace('_', ' ')}" for kind, n in files["bad_jsonl_by_kind"].items() if n
        )
        lines = [
            f"read {files['read']} files in {files['pieces']} pieces; skipped {skipped} "
            f"({files['skipped_not_utf8']} not UTF-8, {files['skipped_empty']} empty); "
            f"{files['bad_jsonl_records']} bad JSONL records" + (f" ({bad})" if bad else ""),
            f"train: {train['tokens']:,} tokens in {train['documents']:,} documents; "
            f"val: {val['tokens']:,} tokens in {val['documents']:,} documents (split by {m['split_by']})",
            f"tokenizer: {m['tokenizer']['kind']}, vocabulary {m['tokenizer']['vocab_size']:,}, {m['dtype']}",
            f"{total:,} tokens in {self.seconds:.1f} s = {total / max(self.seconds, 1e-9):,.0f} tokens/s "
            f"on {self.ranks} rank(s)",
        ]
        for name in files["not_utf8"][:5]:
            lines.append(f"  skipped (not UTF-8): {name}")
        return lines


def prepare(opts: PrepareOptions, comm: Any, progress: bool = True) -> Summary:
    """Collective over `comm`. Returns the summary on every rank."""
    start = time.perf_counter()
    rank = comm.Get_rank()
    plan = root_decides(comm, lambda: _plan(opts))
    staging = Path(plan.staging)
    tokenizer_json = root_decides(comm, lambda: _train_tokenizer(opts, plan.files))
    tokenizer = tok.Tokenizer.from_str(tokenizer_json)
    vocab = tokenizer.get_vocab_size()
    dtype = choose_dtype(vocab, opts.dtype)  # the same verdict on every rank
    root_decides(comm, lambda: (staging / "parts").mkdir(parents=True))

    done = SharedCounters(comm, slots=2)  # bytes read, tokens written: for rank 0's progress bar
    total_bytes = sum(piece.size for piece in plan.pieces)
    bar = _progress_bar(total_bytes) if progress and rank == 0 else None

    def on_done(_: int, stats: PieceStats) -> None:
        read = done.fetch_add(0, stats.bytes) + stats.bytes
        written = done.fetch_add(1, sum(stats.tokens.values())) + sum(stats.tokens.values())
        if bar is not None:  # the work of every rank, as rank 0 last saw it
            bar.n = read
            bar.set_postfix_str(
                f"{written / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", refresh=False
            )
            bar.refresh()

    def work(index: int) -> PieceStats:
        return _tokenize_piece(index, plan, opts, tokenizer, dtype, staging)

    order = largest_first([piece.size for piece in plan.pieces])
    mine = [stats for _, stats in dynamic_map(comm, order, work, on_done)]
    everything = comm.gather(mine, root=0)
    done.free()
    if bar is not None:
        bar.close()
    manifest = root_decides(
        comm, lambda: _assemble(opts, plan, [s for part in everything for s in part], tokenizer, dtype)
    )
    return Summary(manifest, time.perf_counter() - start, comm.Get_size())


def _progress_bar(total_bytes: int) -> Any:
    """Bytes read by all ranks, with bytes/s and the time left."""
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="prepare",
        mininterval=0.5,
        disable=None,
    )


def set_tokenizer_threads(threads: int) -> None:
    """The tokenizers library sizes its thread pool once, from RAYON_NUM_THREADS: give it our share."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
