"""`hpcllm prepare`: corpus → tokenizer → token files + manifest, spread over all ranks.

1. Rank 0 resolves the sources and checks `--out` (every rank gets the plan or the same error).
2. Rank 0 trains the BPE on a deterministic sample of the corpus (the first documents of every
   piece, `--bpe-sample-mb` in all), or loads `--tokenizer`; the tokenizer is broadcast.
3. Every rank tokenizes pieces (whole files, or byte ranges of a large JSONL file: corpus.pieces)
   drawn from a shared work queue (largest first, `tasks.dynamic_map`), streaming their records
   in batches, writing each piece's train and val tokens to a part file named by the piece and
   counting its tokens (for the unigram baseline).
4. A prefix sum over the pieces' sizes, in piece order, gives every part its offset; each rank
   writes its own parts into train.bin and val.bin through MPI-IO (parallel/file_io.py), then the
   ranks hash the files' blocks round-robin and add up their token counts. Rank 0 writes the
   manifest and renames the staging directory to `--out`: no rank reads the whole output.

Each document's split is a hash of (seed, file index, byte offset of its record), and the parts are
laid out in piece order, so the output is byte-identical whatever the number of ranks. Nothing appears at
`--out` until it is complete; an interrupted prepare leaves only a hidden `.NAME.tmp-*` directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
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
    block_digests,
    checksum_entry,
    checksum_of,
    choose_dtype,
    combine_digests,
    n_blocks,
    token_counts,
    unigram_loss_of_counts,
)
from hpcllm.errors import UsageError
from hpcllm.observe.timing import PhaseClock
from hpcllm.parallel.file_io import Run, prefix_offsets, write_runs
from hpcllm.parallel.tasks import SharedCounters, dynamic_map, largest_first, round_robin_map


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


# The BPE's training sample by default: text per vocabulary entry to learn (1 MiB for 4096). Its
# training is the one serial step of prepare (about 1 s per MiB on a core); 4x the text gives a
# tokenizer about 3% denser on the default corpus, at 4x that step (--bpe-sample-mb).
SAMPLE_BYTES_PER_TOKEN = 256
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
    if opts.bpe_sample_bytes < 0:
        raise UsageError(f"--bpe-sample-mb must not be negative, not {opts.bpe_sample_bytes / (1 << 20):g}")
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


def _train_tokenizer(opts: PrepareOptions, plan: Plan) -> str:
    if opts.tokenizer == "byte":
        return tok.byte_tokenizer().to_str()
    given = tok.given_file(opts.tokenizer)
    if given is not None:
        return tok.load(given).to_str()
    size = opts.bpe_sample_bytes or SAMPLE_BYTES_PER_TOKEN * opts.vocab_size
    return tok.train_bpe(bpe_sample(plan, opts.text_field, size), opts.vocab_size).to_str()


def bpe_sample(plan: Plan, text_field: str, sample_bytes: int) -> Iterator[str]:
    """The BPE's training text: the first documents of every piece, an equal share of
    `sample_bytes` from each (the last one cut), so it spans the whole corpus and is the same for
    any rank count."""
    share = -(-sample_bytes // len(plan.pieces))
    for piece in plan.pieces:
        left = share
        for _, text in corpus.read_piece(
            Path(plan.files[piece.file]), piece, text_field, corpus.Documents(Counter())
        ):
            yield text[:left]
            left -= len(text)
            if left <= 0:
                break


def in_val(seed: int, file_index: int, doc_index: int, val_ratio: float) -> bool:
    """A document's split, from a hash: independent of which rank reads it, or when."""
    digest = hashlib.blake2b(f"{seed}:{file_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_ratio


def part_path(staging: Path, index: int, split: str) -> Path:
    return staging / "parts" / f"{index:08d}.{split}.bin"


def _tokenize_piece(
    index: int,
    plan: Plan,
    opts: PrepareOptions,
    tokenizer: Any,
    dtype: np.dtype,
    counts: dict[str, np.ndarray],  # this rank's token counts per split, added to
) -> PieceStats:
    """Tokenize one piece, streaming its documents in batches into its train and val part files."""
    staging = Path(plan.staging)
    piece = plan.pieces[index]
    stats = PieceStats(index, piece.file, piece.size)
    found = corpus.Documents(Counter())
    eot = np.array([tok.eot_id(tokenizer)], dtype=dtype)
    outputs = {split: open(part_path(staging, index, split), "wb") for split in SPLITS}  # noqa: SIM115
    try:
        batch: list[tuple[int, str]] = []
        size = 0

        def flush() -> None:
            written: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
            for (offset, _), encoding in zip(
                batch, tokenizer.encode_batch([t for _, t in batch]), strict=True
            ):
                split = "val" if in_val(opts.seed, piece.file, offset, opts.val_ratio) else "train"
                written[split] += [np.asarray(encoding.ids, dtype=dtype), eot]
                stats.documents[split] += 1
            for split, runs in written.items():
                if runs:
                    ids = np.concatenate(runs)
                    outputs[split].write(ids.tobytes())
                    stats.tokens[split] += ids.size
                    counts[split] += np.bincount(ids, minlength=len(counts[split]))
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


def _no_documents(opts: PrepareOptions, plan: Plan, stats: list[PieceStats]) -> UsageError:
    skipped = Counter(s.skipped for s in stats if s.skipped)
    detail = ", ".join(f"{n} {why.replace('_', '-')}" for why, n in skipped.items()) or "no text"
    bad = Counter()
    for s in stats:
        bad.update(s.bad)
    if bad:
        detail += f", {sum(bad.values())} bad JSONL records"
    if bad["missing_field"] and bad["missing_field"] == sum(bad.values()):
        detail += f": none has a text field {opts.text_field!r}; name the right one with --field"
    return UsageError(f"the corpus has no documents ({len(plan.files)} files: {detail}); check the sources")


@dataclass
class Written:
    """The token files as written: how the split was cut, and per split its tokens, documents,
    checksum entry and token counts."""

    split_by: str
    tokens: dict[str, int]
    documents: dict[str, int]
    checksums: dict[str, dict[str, Any]]
    counts: dict[str, np.ndarray]


def _write_in_parallel(
    comm: Any,
    plan: Plan,
    stats: list[PieceStats],
    mine: set[int],
    dtype: np.dtype,
    counts: dict[str, np.ndarray],
) -> Written:
    """Collective: each rank writes its parts at their offsets in piece order, the ranks hash the
    files' blocks round-robin and add up their token counts."""
    staging = Path(plan.staging)
    checksums = {}
    for split in SPLITS:
        sizes = [s.tokens[split] * dtype.itemsize for s in stats]
        runs = [
            Run(part_path(staging, s.index, split), offset)
            for s, offset in zip(stats, prefix_offsets(sizes), strict=True)
            if s.index in mine
        ]
        path = staging / f"{split}.bin"
        write_runs(comm, path, sum(sizes), runs)
        digests = round_robin_map(comm, n_blocks(sum(sizes)), partial(block_digests, path))
        checksums[split] = checksum_entry(combine_digests(digests))
        for run in runs:
            run.source.unlink()
    totals = {split: np.zeros_like(counts[split]) for split in SPLITS}
    for split in SPLITS:
        comm.Allreduce(counts[split], totals[split])
    return Written(
        "documents",
        {split: sum(s.tokens[split] for s in stats) for split in SPLITS},
        {split: sum(s.documents[split] for s in stats) for split in SPLITS},
        checksums,
        totals,
    )


def _cut_token_stream(
    opts: PrepareOptions, plan: Plan, stats: list[PieceStats], dtype: np.dtype, vocab: int
) -> Written:
    """Too few documents for a document split (one big text file, say): rank 0 joins the parts
    and cuts the token stream instead. Small corpora only: a corpus of many documents never gets here."""
    staging = Path(plan.staging)
    parts = [np.fromfile(part_path(staging, s.index, split), dtype=dtype) for s in stats for split in SPLITS]
    stream = np.concatenate(parts)
    if stream.size < 2:
        raise UsageError(f"the corpus has only {stream.size} token(s); give it more text")
    cut = min(stream.size - 1, max(1, int(round(stream.size * (1 - opts.val_ratio)))))
    stream[:cut].tofile(staging / "train.bin")
    stream[cut:].tofile(staging / "val.bin")
    return Written(
        "tokens",
        {"train": cut, "val": int(stream.size - cut)},
        {split: sum(s.documents[split] for s in stats) for split in SPLITS},
        {split: checksum_of(staging / f"{split}.bin") for split in SPLITS},
        {"train": token_counts(stream[:cut], vocab), "val": token_counts(stream[cut:], vocab)},
    )


def _finish(
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    tokenizer: Any,
    dtype: np.dtype,
    written: Written,
) -> dict[str, Any]:
    """Rank 0: tokenizer and manifest into the staging directory, and the result into place."""
    staging = Path(plan.staging)
    shutil.rmtree(staging / "parts")
    tokenizer.save(str(staging / TOKENIZER))
    manifest = _manifest(opts, plan, stats, tokenizer, dtype, written)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _move_into_place(staging, opts.out)
    return manifest


def _manifest(
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    tokenizer: Any,
    dtype: np.dtype,
    written: Written,
) -> dict[str, Any]:
    skipped = Counter(s.skipped for s in stats if s.skipped)
    vocab, eot = tokenizer.get_vocab_size(), tok.eot_id(tokenizer)
    not_utf8 = [plan.files[s.file] for s in stats if s.skipped == "not_utf8"]
    bad = {kind: sum(s.bad.get(kind, 0) for s in stats) for kind in corpus.BAD_KINDS}
    return {
        "format": FORMAT_VERSION,
        "created_by": f"hpcllm {hpcllm.__version__}",
        "tokenizer": {"kind": opts.tokenizer, "vocab_size": vocab, "eot_id": eot, "file": TOKENIZER},
        "dtype": dtype.name,
        "seed": opts.seed,
        "val_ratio": opts.val_ratio,
        "split_by": written.split_by,
        # Counted while tokenizing, so that a training start needs no pass over the data.
        "unigram_loss": unigram_loss_of_counts(written.counts["train"], written.counts["val"]),
        "splits": {
            split: {
                "file": f"{split}.bin",
                "tokens": int(written.tokens[split]),
                "documents": written.documents[split],
                "checksum": written.checksums[split],
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
    phases: dict[str, float]  # seconds of: tokenizer (planning included), tokenize, write, finish
    peak_memory_mib: list[float]  # per rank: its process's peak resident memory

    def to_dict(self) -> dict[str, Any]:
        splits = self.manifest["splits"]
        return {
            "seconds": self.seconds,
            "ranks": self.ranks,
            "tokens": sum(splits[s]["tokens"] for s in SPLITS),
            "bytes": sum(row["bytes"] for row in self.manifest["per_source"]),
            "phases": self.phases,
            "peak_memory_mib": self.peak_memory_mib,
        }

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
            f"on {self.ranks} rank(s): "
            + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases.items())
            + f"; peak memory per rank {max(self.peak_memory_mib):,.0f} MiB",
        ]
        for name in files["not_utf8"][:5]:
            lines.append(f"  skipped (not UTF-8): {name}")
        return lines


def prepare(opts: PrepareOptions, comm: Any, progress: bool = True) -> Summary:
    """Collective over `comm`. Returns the summary on every rank."""
    start = time.perf_counter()
    phases = PhaseClock()
    rank = comm.Get_rank()
    plan = root_decides(comm, lambda: _plan(opts))
    staging = Path(plan.staging)
    tokenizer_json = root_decides(comm, lambda: _train_tokenizer(opts, plan))
    tokenizer = tok.Tokenizer.from_str(tokenizer_json)
    vocab = tokenizer.get_vocab_size()
    dtype = choose_dtype(vocab, opts.dtype)  # the same verdict on every rank
    root_decides(comm, lambda: (staging / "parts").mkdir(parents=True))
    phases.lap("tokenizer")

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

    counts = {split: np.zeros(vocab, dtype=np.int64) for split in SPLITS}

    def work(index: int) -> PieceStats:
        return _tokenize_piece(index, plan, opts, tokenizer, dtype, counts)

    order = largest_first([piece.size for piece in plan.pieces])
    mine = [stats for _, stats in dynamic_map(comm, order, work, on_done)]
    stats = sorted((s for part in comm.allgather(mine) for s in part), key=lambda s: s.index)
    done.free()
    if bar is not None:
        bar.close()
    phases.lap("tokenize")
    documents = {split: sum(s.documents[split] for s in stats) for split in SPLITS}
    if not all(documents.values()):  # no documents at all, or too few for a document split

        def serially() -> dict[str, Any]:
            try:
                if not any(documents.values()):
                    raise _no_documents(opts, plan, stats)
                written = _cut_token_stream(opts, plan, stats, dtype, vocab)
            except UsageError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return _finish(opts, plan, stats, tokenizer, dtype, written)

        manifest = root_decides(comm, serially)
    else:
        written = _write_in_parallel(comm, plan, stats, {s.index for s in mine}, dtype, counts)
        phases.lap("write")
        manifest = root_decides(comm, lambda: _finish(opts, plan, stats, tokenizer, dtype, written))
    phases.lap("finish")
    peak = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    return Summary(manifest, time.perf_counter() - start, comm.Get_size(), phases.laps, peak)


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
