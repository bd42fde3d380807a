"""Training on a weighted mixture of prepared datasets (`--data A:0.7,B:0.3`, or `data.mix`).

Sample k of a run (the same position the single-dataset sampler reads, see loader.py) goes to
one dataset, chosen by a closed-form rule of (seed, k): the number of the first k samples given
to dataset j is a nested floor,

    c_1(k) = floor((k * q_1 + theta_1) / Q),  c_2(k) = floor(((k - c_1) * q_2 + theta_2) / (Q - q_1)), ...

with the weights as integers q_j summing to Q and offsets theta_j drawn from the seed. Each count
grows by 0 or 1 per sample and stays within a few samples of k * w_j at every k, so the realised
proportions match the weights from the first batches on; sample k goes to the dataset whose count
grows at k, and is that dataset's c_j(k)-th sample, read through its own epoch permutation. Like
the single-dataset sampler, the whole state is k: the choice does not depend on the layout, and a
resume continues exactly. Every dataset must share one tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcllm.batch import Batch
from hpcllm.data import tokenizer as tok
from hpcllm.data.loader import BatchSampler, rank_slice
from hpcllm.data.packing import PackedSamples
from hpcllm.data.sequences import TokenWindows
from hpcllm.data.tokens import Prepared, split_digest
from hpcllm.errors import UsageError

SCALE = 1 << 16  # weights as integers out of this: counts stay exact in int64 up to 2**47 samples


@dataclass(frozen=True)
class Component:
    path: str
    weight: float


def parse_mix(text: str) -> list[Component]:
    """'DIR:WEIGHT,DIR:WEIGHT,...' with positive weights (normalised to sum to one)."""
    components = []
    for item in (part.strip() for part in text.split(",")):
        path, sep, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not path or value is None:
            raise UsageError(f"data.mix: {item!r} is not DIR:WEIGHT; write e.g. --data web:0.7,code:0.3")
        if not value > 0 or value == float("inf"):
            raise UsageError(f"data.mix: the weight of {path} is {weight}; weights must be positive numbers")
        components.append(Component(path, value))
    paths = [c.path for c in components]
    if len(set(paths)) != len(paths):
        raise UsageError(f"data.mix names a dataset twice ({text}); give each once, with its whole weight")
    total = sum(c.weight for c in components)
    return [Component(c.path, c.weight / total) for c in components]


def components_of(path: str, mix: str) -> list[Component]:
    """The datasets of a run's data section: data.mix's, or data.path alone with weight 1."""
    if mix and path:
        raise UsageError("give data.path or data.mix, not both (--data takes either form)")
    return parse_mix(mix) if mix else [Component(path, 1.0)]


def is_mix(text: str) -> bool:
    """Whether a `--data` value is a mixture (DIR:WEIGHT, ...) rather than one directory."""
    head, sep, weight = text.rpartition(":")
    if "," in text:
        return True
    try:
        float(weight)
    except ValueError:
        return False
    return bool(sep and head)


def integer_weights(weights: Sequence[float]) -> np.ndarray:
    """The weights as integers summing to SCALE, each at least one (largest remainder)."""
    exact = np.asarray(weights, dtype=np.float64) * SCALE
    out = np.maximum(np.floor(exact).astype(np.int64), 1)
    for j in np.argsort(-(exact - np.floor(exact)), kind="stable")[: SCALE - out.sum()]:
        out[j] += 1
    while out.sum() > SCALE:  # only when tiny weights were raised to one
        out[np.argmax(out)] -= 1
    return out


class MixedRows:
    """The datasets' sequences seen as one: sequence i of the mixture is sequence i - first[j] of
    dataset j, read by that dataset's reader (hpcllm.data.sequences)."""

    def __init__(self, readers: Sequence[Any]):
        self.readers = list(readers)
        self.first = np.concatenate([[0], np.cumsum([r.n_sequences for r in readers])]).astype(np.int64)

    @property
    def n_sequences(self) -> int:
        return int(self.first[-1])

    def rows(self, indices: np.ndarray) -> Batch:
        owner = np.searchsorted(self.first, indices, side="right") - 1
        parts = {int(j): self.readers[j].rows(indices[owner == j] - self.first[j]) for j in np.unique(owner)}
        if len(parts) == 1:
            return next(iter(parts.values()))
        packed = any(part.documents is not None for part in parts.values())
        fields = ("tokens", "targets", "positions", "documents") if packed else ("tokens", "targets")
        out, width = {}, next(iter(parts.values())).tokens.shape[1]
        for name in fields:
            column = np.empty((len(indices), width), dtype=np.int64)
            for j, part in parts.items():
                column[owner == j] = _field(part, name)
            out[name] = column
        return Batch(**out)


def _field(batch: Batch, name: str) -> np.ndarray:
    """A batch's field, with the defaults of one document per row where it has none."""
    value = getattr(batch, name)
    if value is not None:
        return value
    rows, time = batch.tokens.shape
    if name == "positions":
        return np.broadcast_to(np.arange(time), (rows, time))
    return np.zeros((rows, time), dtype=np.int64)


class MixtureSampler:
    """BatchSampler's interface over several datasets: global_indices and rank_indices return
    sequence indices of MixedRows."""

    def __init__(self, samplers: Sequence[BatchSampler], weights: Sequence[float], seed: int):
        self.samplers = list(samplers)
        self.q = integer_weights(weights)
        rng = np.random.default_rng([seed, 0x6D6978])  # "mix"
        left = SCALE - np.concatenate([[0], np.cumsum(self.q)[:-1]])  # weight not yet assigned
        self.theta = np.array([rng.integers(0, int(m)) for m in left], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum([s.n_sequences for s in samplers])]).astype(np.int64)

    def counts(self, k: np.ndarray) -> np.ndarray:
        """Samples of the first k (per entry of k) given to each dataset: shape [len(k), datasets]."""
        remaining = np.asarray(k, dtype=np.int64).copy()
        out = np.empty((remaining.size, len(self.q)), dtype=np.int64)
        left = SCALE
        for j, q in enumerate(self.q[:-1]):
            out[:, j] = (remaining * q + self.theta[j]) // left
            remaining -= out[:, j]
            left -= int(q)
        out[:, -1] = remaining
        return out

    def global_indices(self, first: int, count: int) -> np.ndarray:
        """Mixture sequence indices of samples [first, first + count) of the run."""
        counts = self.counts(np.arange(first, first + count + 1))
        before, after = counts[0], counts[-1]
        chosen = np.argmax(np.diff(counts, axis=0), axis=1)  # the dataset whose count grows at each sample
        out = np.empty(count, dtype=np.int64)
        for j, sampler in enumerate(self.samplers):
            n = int(after[j] - before[j])
            if n:  # dataset j's samples here are its next n, in order
                out[chosen == j] = self.first[j] + sampler.global_indices(int(before[j]), n)
        return out

    def rank_indices(self, first: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        return rank_slice(self.global_indices, first, global_batch, dp_rank, dp_size)

    def proportions(self, samples: int) -> np.ndarray:
        """The share of the first `samples` samples each dataset got."""
        return self.counts(np.array([samples]))[0] / max(1, samples)


Sampler = BatchSampler | MixtureSampler


@dataclass(frozen=True)
class Mixture:
    """The datasets a run trains on, with their weights (one dataset: weight 1), and how their
    sequences are read: `packing` for fine-tuning samples, `document_mask` for token streams."""

    datasets: list[Prepared]
    weights: list[float]
    packing: bool = True
    document_mask: bool = False

    @property
    def loss_masked(self) -> bool:
        """Whether some targets are not trained on (hpcllm.batch.IGNORE): fine-tuning data's loss
        masks and padding, or document-masked token streams' ends of documents."""
        return self.document_mask or any(d.is_sft for d in self.datasets)

    def reader(self, data: Prepared, split: str, block_size: int) -> Any:
        """How one dataset's split is read (hpcllm.data.sequences)."""
        if data.is_sft:
            return PackedSamples.of_split(data, split, block_size, self.packing)
        return TokenWindows(data.tokens(split), block_size, data.eot_id if self.document_mask else None)

    @property
    def primary(self) -> Prepared:
        """The first dataset: its tokenizer and vocabulary are every dataset's."""
        return self.datasets[0]

    def stream(self, split: str, block_size: int, seed: int) -> tuple[Sampler, Any]:
        """(sampler, reader) of the split: the plain sampler for one dataset, else the mixture's.
        A split shorter than one sequence in any dataset is a UsageError."""
        readers = [self.reader(d, split, block_size) for d in self.datasets]
        if len(readers) == 1:
            return BatchSampler(readers[0].n_sequences, seed), readers[0]
        samplers = [BatchSampler(r.n_sequences, seed + 1000 * j) for j, r in enumerate(readers)]
        return MixtureSampler(samplers, self.weights, seed), MixedRows(readers)

    def identity(self) -> str:
        """What a resumed run must find again: the train split's checksum (and weights, if mixed)."""
        digests = [split_digest(d.manifest, "train") for d in self.datasets]
        if len(digests) == 1:
            return digests[0]
        return "mix:" + ",".join(f"{d}:{w!r}" for d, w in zip(digests, self.weights, strict=True))

    def unigram_loss(self) -> float | None:
        """The weights' average of the datasets' recorded unigram baselines (None if one lacks it)."""
        losses = [d.manifest.get("unigram_loss") for d in self.datasets]
        if any(loss is None for loss in losses):
            return None
        return float(sum(w * loss for w, loss in zip(self.weights, losses, strict=True)))


def check_shared_tokenizer(datasets: Sequence[Prepared]) -> None:
    """Every dataset of a mixture must have been prepared with the first one's tokenizer."""
    first = tok.vocabulary(datasets[0].tokenizer_path)
    for other in datasets[1:]:
        if tok.vocabulary(other.tokenizer_path) != first:
            raise UsageError(
                f"data.mix: {other.path} was prepared with another tokenizer than {datasets[0].path}; "
                f"prepare it again with `hpcllm prepare --tokenizer {datasets[0].tokenizer_path}`"
            )
