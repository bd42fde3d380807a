"""The fine-tuning half of `hpcllm prepare --format sft`: records of a piece into samples on this
rank's spools (tokens, loss mask, length per sample), and what the summary says of them.

Pieces, the work queue, the parallel write and the manifest are pretraining's (prepare.py,
prepare_write.py): a sample is a document, with a mask and a length beside its tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.chat import chat_template, template_of
from hpcllm.data.prepare_plan import PieceStats, Plan, PrepareOptions, in_val
from hpcllm.data.sft import BAD_KINDS, Sample, SftEncoder
from hpcllm.data.tokens import CHAT_TEMPLATE, SIDE_FILES, SPLITS
from hpcllm.errors import UsageError


def sft_encoder(opts: PrepareOptions, tokenizer: Any) -> SftEncoder:
    boundaries = tok.document_tokens(tokenizer)
    bos = None if boundaries.bos is None else tokenizer.id_to_token(boundaries.bos)
    eos = tokenizer.id_to_token(boundaries.eos)
    template = chat_template(opts.tokenizer_folder, opts.chat_template, bos, eos)
    return SftEncoder(
        tokenizer, template, boundaries, opts.train_on, opts.too_long, opts.max_tokens, opts.fields
    )


def tokenize_sft_piece(
    index: int,
    plan: Plan,
    opts: PrepareOptions,
    encoder: SftEncoder,
    dtype: np.dtype,
    rank: int,
    spools: dict[str, BinaryIO],  # this rank's spool per stream (PrepareOptions.streams), appended to
    counts: dict[str, np.ndarray],  # this rank's token counts per split, added to
) -> PieceStats:
    """One piece's records as samples, each appended to its split's three spools."""
    piece = plan.pieces[index]
    stats = PieceStats(index, piece.file, piece.size, rank, {name: f.tell() for name, f in spools.items()})
    found = corpus.Documents(Counter())
    for offset, record in corpus.read_records(Path(plan.files[piece.file]), piece, found):
        sample = encoder.encode(record)
        if not isinstance(sample, Sample):
            found.bad[sample] += 1
            continue
        split = "val" if in_val(opts.seed, piece.file, offset, opts.val_ratio) else "train"
        _append(spools, split, sample, dtype)
        stats.tokens[split] += len(sample.ids)
        stats.documents[split] += 1
        stats.trained[split] += int(sample.mask.sum())
        stats.truncated += sample.truncated
        counts[split] += np.bincount(sample.ids, minlength=len(counts[split]))
    stats.bad = dict(found.bad)
    return stats


def _append(spools: dict[str, BinaryIO], split: str, sample: Sample, dtype: np.dtype) -> None:
    spools[split].write(sample.ids.astype(dtype).tobytes())
    spools[f"{split}.mask"].write(sample.mask.astype(SIDE_FILES["mask"]).tobytes())
    spools[f"{split}.lengths"].write(np.array([len(sample.ids)], dtype=SIDE_FILES["lengths"]).tobytes())


def no_samples(stats: list[PieceStats]) -> UsageError:
    bad = Counter()
    for s in stats:
        bad.update(s.bad)
    detail = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in bad.most_common()) or "no records"
    fields = "--prompt-field, --completion-field or --messages-field"
    hint = f"; name the record's fields with {fields}" if bad["missing_field"] else ""
    return UsageError(f"no record became a training sample ({detail}){hint}")


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """The samples' part of prepare's summary."""
    info = manifest["sft"]
    parts = []
    for split in SPLITS:
        s = manifest["splits"][split]
        parts.append(
            f"{split}: {s['samples']:,} samples, {s['tokens']:,} tokens "
            f"({s['trained_tokens']:,} trained, {s['masked_tokens']:,} masked)"
        )
    return [
        "; ".join(parts),
        f"trained on {info['train_on']} tokens; chat template: {info['chat_template']}; "
        f"{info['truncated']:,} samples truncated to {info['max_tokens']:,} tokens",
    ]


def add_sft_parts(
    manifest: dict[str, Any],
    opts: PrepareOptions,
    stats: list[PieceStats],
    checksums: dict[str, dict[str, Any]],
    staging: Path,
) -> None:
    """Rank 0: a fine-tuning manifest's own entries (kind, the side files, samples and trained
    tokens per split, records left out by kind, the options), and the chat template beside it."""
    text, source = template_of(opts.tokenizer_folder, opts.chat_template)
    (staging / CHAT_TEMPLATE).write_text(text)
    manifest["kind"] = "sft"
    for split in SPLITS:
        info = manifest["splits"][split]
        info["samples"] = info["documents"]
        info["trained_tokens"] = sum(s.trained[split] for s in stats)
        info["masked_tokens"] = info["tokens"] - info["trained_tokens"]
        for what in SIDE_FILES:
            info[what] = {"file": f"{split}.{what}.bin", "checksum": checksums[f"{split}.{what}"]}
    kinds = corpus.BAD_KINDS + tuple(k for k in BAD_KINDS if k not in corpus.BAD_KINDS)
    bad = {kind: sum(s.bad.get(kind, 0) for s in stats) for kind in kinds}
    manifest["files"]["bad_jsonl_records"] = sum(bad.values())
    manifest["files"]["bad_jsonl_by_kind"] = bad
    manifest["sft"] = {
        "train_on": opts.train_on,
        "too_long": opts.too_long,
        "max_tokens": opts.max_tokens,
        "truncated": sum(s.truncated for s in stats),
        "chat_template": source,
        "fields": vars(opts.fields),
    }
