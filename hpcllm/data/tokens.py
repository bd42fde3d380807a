"""Token files on disk: flat binaries of token ids plus `manifest.json`, checked before use.

A prepared directory holds `train.bin`, `val.bin`, `tokenizer.json` and `manifest.json`. The
manifest records the tokenizer, the dtype, token and document counts, the sources and a SHA-256 of
each binary; `open_prepared` refuses a directory whose binaries do not match it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.errors import UsageError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits, else uint32; a requested dtype too small is bad input."""
    fits16 = vocab_size <= 2**16
    if requested == "auto":
        return np.dtype(np.uint16 if fits16 else np.uint32)
    if requested not in ("uint16", "uint32"):
        raise UsageError(f"--dtype must be auto, uint16 or uint32, not {requested}")
    if requested == "uint16" and not fits16:
        raise UsageError(
            f"a vocabulary of {vocab_size} tokens does not fit uint16 (max 65536); use --dtype uint32"
        )
    return np.dtype(requested)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Streamed, so a large token file is never loaded whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Prepared:
    """A verified prepared directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["tokenizer"]["eot_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def tokens(self, split: str) -> np.memmap:
        """The split's tokens, memory-mapped read-only (pages load on demand)."""
        info = self.manifest["splits"][split]
        if info["tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)  # np.memmap refuses empty files
        return np.memmap(self.path / info["file"], dtype=self.dtype, mode="r")


def open_prepared(path: str | Path, verify: bool = True) -> Prepared:
    """Open a prepared directory; with `verify`, check every binary's size and checksum."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(
            f"{root} holds no prepared data ({MANIFEST} missing); run `hpcllm prepare --out {root}`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        dtype = np.dtype(manifest["dtype"])
        splits = {name: manifest["splits"][name] for name in SPLITS}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{manifest_path} is not a valid hpcllm manifest ({exc}); prepare the data again"
        ) from exc
    for info in splits.values():
        binary = root / info["file"]
        if not binary.is_file():
            raise UsageError(f"{binary} is missing; prepare the data again")
        expected_bytes = info["tokens"] * dtype.itemsize
        if binary.stat().st_size != expected_bytes:
            raise UsageError(
                f"{binary} has {binary.stat().st_size} bytes but the manifest says {expected_bytes}; "
                "it is truncated or from another run: prepare the data again"
            )
        if verify and sha256_of(binary) != info["sha256"]:
            raise UsageError(
                f"{binary} does not match the checksum in {MANIFEST}: it changed after prepare; "
                "prepare the data again"
            )
    return Prepared(root, manifest)


def _counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token counts, a chunk at a time (bincount widens to int64: a whole file at once would take
    four times its size in memory)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val of the train unigram distribution (add-one smoothed): the
    loss of a model that ignores context. A language model must land well below it."""
    counts = _counts(train_tokens, vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    val_counts = _counts(val_tokens, vocab_size)
    return float(-(val_counts * log_probs).sum() / max(1, val_counts.sum()))
