"""The writing half of `hpcllm prepare`: the tokenized parts into train.bin and val.bin, their
checksums and token counts, the manifest, and the finished directory into place.

In parallel (`write_in_parallel`): a prefix sum over the pieces' sizes in piece order gives every
piece its offset, each rank copies its own pieces from its spool files through MPI-IO
(parallel/file_io.py), the ranks hash the files' blocks round-robin and add up their token counts.
Rank 0 then writes the tokenizer and the manifest (`finish`) and renames the staging directory to
`--out`: no rank reads the whole output.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import hpcllm
from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.prepare_plan import PieceStats, Plan, PrepareOptions, spool_dir, spool_path
from hpcllm.data.prepare_sft import add_sft_parts
from hpcllm.data.tokens import (
    FORMAT_VERSION,
    MANIFEST,
    SIDE_FILES,
    SPLITS,
    TOKENIZER,
    block_digests,
    checksum_entry,
    checksum_of,
    combine_digests,
    n_blocks,
    token_counts,
    unigram_loss_of_counts,
)
from hpcllm.errors import UsageError
from hpcllm.parallel.file_io import Run, prefix_offsets, write_runs
from hpcllm.parallel.tasks import round_robin_map


def no_documents(opts: PrepareOptions, plan: Plan, stats: list[PieceStats]) -> UsageError:
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


def _stream_bytes(stream: str, piece: PieceStats, dtype: np.dtype) -> int:
    """Bytes of one piece's part of a stream: tokens, or a fine-tuning split's mask or lengths."""
    split, _, what = stream.partition(".")
    if what == "lengths":
        return piece.documents[split] * SIDE_FILES["lengths"].itemsize
    return piece.tokens[split] * (SIDE_FILES["mask"] if what == "mask" else dtype).itemsize


def write_in_parallel(
    comm: Any,
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    dtype: np.dtype,
    counts: dict[str, np.ndarray],
    documents: dict[str, int],
) -> Written:
    """Collective: each rank copies its pieces from its spools to their offsets in piece order, the
    ranks hash the files' blocks round-robin and add up their token counts."""
    staging = Path(plan.staging)
    rank = comm.Get_rank()
    checksums = {}
    for stream in opts.streams:
        sizes = [_stream_bytes(stream, s, dtype) for s in stats]
        spool = spool_path(staging, rank, stream)
        runs = [
            Run(spool, s.start[stream], size, offset)
            for s, size, offset in zip(stats, sizes, prefix_offsets(sizes), strict=True)
            if s.rank == rank
        ]
        path = staging / f"{stream}.bin"
        write_runs(comm, path, sum(sizes), runs)
        digests = round_robin_map(comm, n_blocks(sum(sizes)), partial(block_digests, path))
        checksums[stream] = checksum_entry(combine_digests(digests))
        spool.unlink()
    totals = {split: np.zeros_like(counts[split]) for split in SPLITS}
    for split in SPLITS:
        comm.Allreduce(counts[split], totals[split])
    return Written(
        "documents",
        {split: sum(s.tokens[split] for s in stats) for split in SPLITS},
        documents,
        checksums,
        totals,
    )


def cut_token_stream(
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    dtype: np.dtype,
    vocab: int,
    documents: dict[str, int],
) -> Written:
    """Too few documents for a document split (one big text file, say): rank 0 joins the parts
    and cuts the token stream instead. Small corpora only: a corpus of many documents never gets here."""
    staging = Path(plan.staging)
    parts = [
        np.fromfile(
            spool_path(staging, s.rank, split), dtype=dtype, count=s.tokens[split], offset=s.start[split]
        )
        for s in stats
        for split in SPLITS
    ]
    stream = np.concatenate(parts)
    if stream.size < 2:
        raise UsageError(f"the corpus has only {stream.size} token(s); give it more text")
    cut = min(stream.size - 1, max(1, int(round(stream.size * (1 - opts.val_ratio)))))
    stream[:cut].tofile(staging / "train.bin")
    stream[cut:].tofile(staging / "val.bin")
    return Written(
        "tokens",
        {"train": cut, "val": int(stream.size - cut)},
        documents,
        {split: checksum_of(staging / f"{split}.bin") for split in SPLITS},
        {"train": token_counts(stream[:cut], vocab), "val": token_counts(stream[cut:], vocab)},
    )


def finish(
    opts: PrepareOptions,
    plan: Plan,
    stats: list[PieceStats],
    tokenizer: Any,
    dtype: np.dtype,
    written: Written,
) -> dict[str, Any]:
    """Rank 0: tokenizer and manifest into the staging directory, and the result into place."""
    staging = Path(plan.staging)
    shutil.rmtree(spool_dir(staging))
    tokenizer.save(str(staging / TOKENIZER))
    manifest = _manifest(opts, plan, stats, tokenizer, dtype, written)
    if opts.format == "sft":
        add_sft_parts(manifest, opts, stats, written.checksums, staging)
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
    vocab, boundaries = tokenizer.get_vocab_size(), tok.document_tokens(tokenizer)
    not_utf8 = [plan.files[s.file] for s in stats if s.skipped == "not_utf8"]
    bad = {kind: sum(s.bad.get(kind, 0) for s in stats) for kind in corpus.BAD_KINDS}
    return {
        "format": FORMAT_VERSION,
        "created_by": f"hpcllm {hpcllm.__version__}",
        "tokenizer": {
            "kind": opts.tokenizer,
            "vocab_size": vocab,
            "eot_id": boundaries.eos,
            "bos_id": boundaries.bos,
            "file": TOKENIZER,
        },
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
