"""Multiple-choice tasks in the HellaSwag layout: `{"context": ..., "endings": [...], "label": i}`
per JSONL line, scored by each ending's log-likelihood after the context.

Each (example, ending) pair is one row: the context's ids as a prompt is encoded (after the
beginning-of-document token, if the tokenizer has one), then the ending's ids, encoded on their own
(so write the space between them into the ending, as HellaSwag's endings have it); only the
ending's tokens are targets, so a row's loss sum is minus the ending's log-likelihood. A row longer
than block_size + 1 tokens loses its context's first tokens. An example is right when its label's
ending is the most likely (`accuracy`) and when it is per character of the ending
(`accuracy_norm`, lm-evaluation-harness's acc_norm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.batch import IGNORE, Batch
from hpcllm.data import tokenizer as tok
from hpcllm.errors import UsageError


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int


def read_examples(path: str | Path) -> list[Example]:
    """Every line checked; the first bad one is a UsageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"choices file {path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.append(_example(line, f"{path}:{number}"))
    if not examples:
        raise UsageError(f"choices file {path} holds no examples")
    return examples


def _example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not JSON ({exc.msg})") from exc
    layout = '{"context": TEXT, "endings": [TEXT, ...], "label": INDEX}'
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be {layout}")
    context, endings, label = record.get("context"), record.get("endings"), record.get("label")
    if not (
        isinstance(context, str)
        and isinstance(endings, list)
        and all(isinstance(e, str) and e for e in endings)
    ):
        raise UsageError(f"{where}: a record must be {layout}, with non-empty endings")
    if len(endings) < 2:
        raise UsageError(f"{where}: {len(endings)} ending(s); a choice needs at least two")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UsageError(
            f"{where}: label {label!r} is out of range for {len(endings)} endings (0..{len(endings) - 1})"
        )
    return Example(context, tuple(endings), label)


def example_rows(
    tokenizer: Any, examples: list[Example], block_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of every (example, ending) pair, in order, each block_size long (padded
    with IGNORE targets)."""
    eos = tok.document_tokens(tokenizer).eos
    contexts = tok.encode_prompts(tokenizer, [e.context for e in examples])
    rows = []
    for example, context in zip(examples, contexts, strict=True):
        for ending in example.endings:
            ids = tokenizer.encode(ending, add_special_tokens=False).ids
            if len(ids) > block_size:
                raise UsageError(f"an ending of {len(ids)} tokens does not fit block_size {block_size}")
            whole = np.asarray((context + ids)[-(block_size + 1) :], dtype=np.int64)
            inputs = np.full(block_size, eos, dtype=np.int64)
            targets = np.full(block_size, IGNORE, dtype=np.int64)
            inputs[: len(whole) - 1] = whole[:-1]
            targets[len(whole) - 1 - len(ids) : len(whole) - 1] = ids
            rows.append((inputs, targets))
    return rows


def batches_of(rows: list[tuple[np.ndarray, np.ndarray]], size: int) -> list[Batch]:
    return [
        Batch(np.stack([r[0] for r in rows[i : i + size]]), np.stack([r[1] for r in rows[i : i + size]]))
        for i in range(0, len(rows), size)
    ]


def score(examples: list[Example], loss_sums: list[float]) -> dict[str, Any]:
    """Accuracy and length-normalised accuracy from every row's loss sum (in example_rows' order),
    and each example's endings' log-likelihoods (`per_example`, for the result file)."""
    right = right_norm = 0
    at = 0
    per_example = []
    for example in examples:
        likelihoods = -np.asarray(loss_sums[at : at + len(example.endings)], dtype=np.float64)
        per_example.append({"label": example.label, "loglik": likelihoods.tolist()})
        at += len(example.endings)
        lengths = np.array([len(e) for e in example.endings], dtype=np.float64)
        right += int(np.argmax(likelihoods) == example.label)
        right_norm += int(np.argmax(likelihoods / lengths) == example.label)
    return {
        "examples": len(examples),
        "accuracy": right / len(examples),
        "accuracy_norm": right_norm / len(examples),
        "per_example": per_example,
    }
