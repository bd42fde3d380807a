"""`hpcllm prepare`: corpus → tokenizer → token files + manifest, spread over all ranks.

1. Rank 0 resolves the sources and checks `--out` (every rank gets the plan or the same error).
2. Rank 0 trains the BPE on a deterministic sample of the corpus (the first documents of every
   piece, `--bpe-sample-mb` in all), or loads `--tokenizer`; the tokenizer is broadcast.
3. Every rank tokenizes pieces (whole files, or byte ranges of a large JSONL file: corpus.pieces)
   drawn from a shared work queue (largest first, `tasks.dynamic_map`), streaming their records
   in batches, appending each piece's train and val tokens to its own two spool files (where
   each piece starts is in its statistics) and counting its tokens (for the unigram baseline).
4. The ranks copy the pieces into train.bin and val.bin at prefix-sum offsets, hash them and add
   up their token counts; rank 0 writes the manifest and moves the result to `--out`
   (prepare_write.py: no rank reads the whole output).

The options, the plan and the pieces' statistics are in prepare_plan.py.

Each document's split is a hash of (seed, file index, byte offset of its record), and the parts are
laid out in piece order, so the output is byte-identical whatever the number of ranks. Nothing appears at
`--out` until it is complete; an interrupted prepare leaves only a hidden `.NAME.tmp-*` directory.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpcllm.cluster.runtime import root_decides, usable_cores
from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.prepare_plan import (
    PieceStats,
    Plan,
    PrepareOptions,
    check_options,
    in_val,
    plan_pieces,
    spool_dir,
    spool_path,
)
from hpcllm.data.prepare_sft import no_samples, sft_encoder, summary_lines, tokenize_sft_piece
from hpcllm.data.prepare_write import cut_token_stream, finish, no_documents, write_in_parallel
from hpcllm.data.tokens import SPLITS, choose_dtype
from hpcllm.errors import UsageError
from hpcllm.observe.timing import PhaseClock
from hpcllm.parallel.tasks import SharedCounters, dynamic_map, largest_first

__all__ = ["PrepareOptions", "Summary", "check_options", "prepare", "set_tokenizer_threads"]

# The BPE's training sample by default: text per vocabulary entry to learn (1 MiB for 4096). Its
# training is the one serial step of prepare (about 0.7 s per MiB on one core, 0.4 on two); 4x
# the text gives a tokenizer about 3% denser on the default corpus, at 4x that step (--bpe-sample-mb).
SAMPLE_BYTES_PER_TOKEN = 256
BATCH_BYTES = 4 << 20  # text tokenized per encode_batch_fast call: bounds a rank's memory


def _train_tokenizer(opts: PrepareOptions, plan: Plan) -> str:
    if opts.tokenizer == "byte":
        return tok.byte_tokenizer().to_str()
    given = tok.given_file(opts.tokenizer)
    if given is not None:
        return tok.load(given).to_str()
    size = opts.bpe_sample_bytes or SAMPLE_BYTES_PER_TOKEN * opts.vocab_size
    with tok.parallelism(True):  # on the whole pool (set_tokenizer_threads): the other ranks sleep
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


def _tokenize_piece(
    index: int,
    plan: Plan,
    opts: PrepareOptions,
    tokenizer: Any,
    dtype: np.dtype,
    rank: int,
    spools: dict[str, BinaryIO],  # this rank's spool file per split, appended to
    counts: dict[str, np.ndarray],  # this rank's token counts per split, added to
) -> PieceStats:
    """Tokenize one piece, streaming its documents in batches onto the end of this rank's spools."""
    piece = plan.pieces[index]
    stats = PieceStats(index, piece.file, piece.size, rank, {name: f.tell() for name, f in spools.items()})
    found = corpus.Documents(Counter())
    boundaries = tok.document_tokens(tokenizer)
    eot = np.array([boundaries.eos], dtype=dtype)
    bos = np.array([] if boundaries.bos is None else [boundaries.bos], dtype=dtype)
    batch: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        written: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        # encode_batch_fast: encode_batch's ids without the character offsets, about 1.4x faster
        for (offset, _), encoding in zip(
            batch, tokenizer.encode_batch_fast([t for _, t in batch], add_special_tokens=False), strict=True
        ):
            split = "val" if in_val(opts.seed, piece.file, offset, opts.val_ratio) else "train"
            written[split] += [bos, np.asarray(encoding.ids, dtype=dtype), eot]
            stats.documents[split] += 1
        for split, runs in written.items():
            if runs:
                ids = np.concatenate(runs)
                spools[split].write(ids.tobytes())
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
    stats.skipped, stats.bad = found.skipped, dict(found.bad)
    return stats


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
        records = "bad records" if m.get("kind") == "sft" else "bad JSONL records"
        lines = [
            f"read {files['read']} files in {files['pieces']} pieces; skipped {skipped} "
            f"({files['skipped_not_utf8']} not UTF-8, {files['skipped_empty']} empty); "
            f"{files['bad_jsonl_records']} {records}" + (f" ({bad})" if bad else ""),
            *(
                summary_lines(m)
                if m.get("kind") == "sft"
                else [
                    f"train: {train['tokens']:,} tokens in {train['documents']:,} documents; val: "
                    f"{val['tokens']:,} tokens in {val['documents']:,} documents (split by {m['split_by']})"
                ]
            ),
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
    plan = root_decides(comm, lambda: plan_pieces(opts))
    staging = Path(plan.staging)
    tokenizer_json = root_decides(comm, lambda: _train_tokenizer(opts, plan))
    tokenizer = tok.Tokenizer.from_str(tokenizer_json)
    vocab = tokenizer.get_vocab_size()
    dtype = choose_dtype(vocab, opts.dtype)  # the same verdict on every rank
    root_decides(comm, lambda: spool_dir(staging).mkdir(parents=True))
    phases.lap("tokenizer")

    stats, counts = _tokenize_all(comm, opts, plan, tokenizer, dtype, progress and rank == 0, start)
    phases.lap("tokenize")
    documents = {split: sum(s.documents[split] for s in stats) for split in SPLITS}
    if opts.format == "sft" and not documents["train"]:
        root_decides(comm, lambda: shutil.rmtree(staging, ignore_errors=True))
        raise no_samples(stats)  # every rank has every piece's statistics: the same error on each
    # Text with no documents at all, or too few for a document split:
    if opts.format == "text" and not all(documents.values()):

        def serially() -> dict[str, Any]:
            try:
                if not any(documents.values()):
                    raise no_documents(opts, plan, stats)
                written = cut_token_stream(opts, plan, stats, dtype, vocab, documents)
            except UsageError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return finish(opts, plan, stats, tokenizer, dtype, written)

        manifest = root_decides(comm, serially)
    else:
        written = write_in_parallel(comm, opts, plan, stats, dtype, counts, documents)
        phases.lap("write")
        manifest = root_decides(comm, lambda: finish(opts, plan, stats, tokenizer, dtype, written))
    phases.lap("finish")
    peak = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    return Summary(manifest, time.perf_counter() - start, comm.Get_size(), phases.laps, peak)


def _tokenize_all(
    comm: Any, opts: PrepareOptions, plan: Any, tokenizer: Any, dtype: Any, show: bool, start: float
) -> tuple[list[PieceStats], dict[str, np.ndarray]]:
    """Every piece tokenized by whichever rank is free (largest first) into this rank's spools;
    the statistics of all pieces on every rank, and this rank's token counts per split."""
    rank, vocab = comm.Get_rank(), tokenizer.get_vocab_size()
    staging = Path(plan.staging)
    done = SharedCounters(comm, slots=2)  # bytes read, tokens written: for rank 0's progress bar
    total_bytes = sum(piece.size for piece in plan.pieces)
    bar = _progress_bar(total_bytes) if show else None

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
    encoder = sft_encoder(opts, tokenizer) if opts.format == "sft" else None

    order = largest_first([piece.size for piece in plan.pieces])
    with ExitStack() as stack:
        spools = {
            name: stack.enter_context(open(spool_path(staging, rank, name), "wb")) for name in opts.streams
        }

        def work(index: int) -> PieceStats:
            if encoder is not None:
                return tokenize_sft_piece(index, plan, opts, encoder, dtype, rank, spools, counts)
            return _tokenize_piece(index, plan, opts, tokenizer, dtype, rank, spools, counts)

        mine = [stats for _, stats in dynamic_map(comm, order, work, on_done)]
    stats = sorted((s for part in comm.allgather(mine) for s in part), key=lambda s: s.index)
    done.free()
    if bar is not None:
        bar.close()
    return stats, counts


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
    """The tokenizers library sizes its thread pool once, from RAYON_NUM_THREADS, and asks
    TOKENIZERS_PARALLELISM at every call whether to use it. A rank of several threads encodes on a
    pool of its share. A rank of one thread encodes serially, and its pool spans the cores this
    process may run on: the BPE training runs there on rank 0 while the other ranks sleep (the
    one serial step of prepare, about 2x faster on two cores)."""
    if threads > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(usable_cores()))
        os.environ.setdefault(tok.PARALLELISM, "false")
