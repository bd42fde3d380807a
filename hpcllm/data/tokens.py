"""Token files on disk: flat binaries of token ids plus `manifest.json`, checked before use.

A prepared directory holds `train.bin`, `val.bin`, `tokenizer.json` and `manifest.json`. The
manifest records the tokenizer, the dtype, token and document counts, the sources and a checksum of
each binary; `open_prepared` refuses a directory whose binaries do not match it.

Fine-tuning data (`hpcllm prepare --format sft`, manifest kind "sft") has per split two more
binaries (SIDE_FILES): `SPLIT.mask.bin`, one uint8 per token, 1 where the token is a trained
target (predicted from the tokens before it in its sample), and `SPLIT.lengths.bin`, the tokens of
each sample in order (uint32): the samples' boundaries. The template it was rendered with, if any,
is `chat_template.jinja` beside them.

The checksum is a SHA-256 over blocks: the SHA-256 of the concatenated SHA-256 digests of the
file's consecutive `BLOCK_BYTES` blocks. Blocks hash independently, so `hpcllm prepare` spreads
them over its ranks instead of one rank re-reading the whole output; the result does not depend
on how many ranks computed it. (Format 1 manifests hold a plain SHA-256 of the file: still read.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.errors import UsageError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
SPLITS = ("train", "val")
SIDE_FILES = {"mask": np.dtype(np.uint8), "lengths": np.dtype(np.uint32)}  # of fine-tuning data
FORMAT_VERSION = 2
BLOCK_BYTES = 16 << 20  # of a token file, hashed independently (and by different ranks)


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


def block_digests(path: Path, blocks: Iterable[int], block_bytes: int = BLOCK_BYTES) -> list[bytes]:
    """SHA-256 digests of the given blocks of the file."""
    out = []
    with open(path, "rb") as f:
        for block in blocks:
            f.seek(block * block_bytes)
            out.append(hashlib.sha256(f.read(block_bytes)).digest())
    return out


def n_blocks(size: int, block_bytes: int = BLOCK_BYTES) -> int:
    return max(1, -(-size // block_bytes))  # an empty file is one empty block


def combine_digests(digests: Iterable[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def checksum_of(path: Path, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """The manifest's checksum entry of a token file, computed here by one process."""
    blocks = range(n_blocks(path.stat().st_size, block_bytes))
    return checksum_entry(combine_digests(block_digests(path, blocks, block_bytes)), block_bytes)


def checksum_entry(digest: str, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    return {"algorithm": "sha256-blocks", "block_bytes": block_bytes, "digest": digest}


def split_digest(manifest: dict[str, Any], split: str) -> str:
    """What identifies a split's content (a resumed run checks it is training on the same data)."""
    info = manifest["splits"][split]
    return info["checksum"]["digest"] if "checksum" in info else info["sha256"]


def _matches(binary: Path, info: dict[str, Any]) -> bool:
    if "checksum" in info:
        block_bytes = int(info["checksum"]["block_bytes"])
        return checksum_of(binary, block_bytes)["digest"] == info["checksum"]["digest"]
    return sha256_of(binary) == info["sha256"]  # format 1


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

    @property
    def is_sft(self) -> bool:
        """Fine-tuning samples with loss masks (`prepare --format sft`), not a pretraining stream."""
        return self.manifest.get("kind", "tokens") == "sft"

    def files(self) -> list[str]:
        """The data files besides the manifest: binaries, tokenizer, chat template if any."""
        names = [name for split in SPLITS for name, _, _ in _binaries(self.manifest, split)] + [TOKENIZER]
        return names + ([CHAT_TEMPLATE] if (self.path / CHAT_TEMPLATE).is_file() else [])

    def tokens(self, split: str) -> np.memmap:
        """The split's tokens, memory-mapped read-only (pages load on demand)."""
        info = self.manifest["splits"][split]
        return _memmap(self.path / info["file"], self.dtype, info["tokens"])

    def side(self, split: str, what: str) -> np.ndarray:
        """A fine-tuning split's `mask` or `lengths` (SIDE_FILES), memory-mapped read-only."""
        info = self.manifest["splits"][split]
        count = info["tokens"] if what == "mask" else info["samples"]
        return _memmap(self.path / info[what]["file"], SIDE_FILES[what], count)


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")


def _binaries(manifest: dict[str, Any], split: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(file name, expected bytes, manifest entry) of each binary of a split."""
    info = manifest["splits"][split]
    out = [(info["file"], info["tokens"] * np.dtype(manifest["dtype"]).itemsize, info)]
    if manifest.get("kind", "tokens") == "sft":
        counts = {"mask": info["tokens"], "lengths": info["samples"]}
        out += [(info[w]["file"], counts[w] * dtype.itemsize, info[w]) for w, dtype in SIDE_FILES.items()]
    return out


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
        binaries = [entry for name in SPLITS for entry in _binaries(manifest, name)]
        for name in SPLITS:
            split_digest(manifest, name)  # a manifest with no checksum is not one of ours
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{manifest_path} is not a valid hpcllm manifest ({exc}); prepare the data again"
        ) from exc
    for name, expected_bytes, info in binaries:
        binary = root / name
        if not binary.is_file():
            raise UsageError(f"{binary} is missing; prepare the data again")
        if binary.stat().st_size != expected_bytes:
            raise UsageError(
                f"{binary} has {binary.stat().st_size} bytes but the manifest says {expected_bytes}; "
                "it is truncated or from another run: prepare the data again"
            )
        if verify and not _matches(binary, info):
            raise UsageError(
                f"{binary} does not match the checksum in {MANIFEST}: it changed after prepare; "
                "prepare the data again"
            )
    return Prepared(root, manifest)


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token counts, a chunk at a time (bincount widens to int64: a whole file at once would take
    four times its size in memory)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val of the train unigram distribution (add-one smoothed): the
    loss of a model that ignores context. A language model must land well below it."""
    return unigram_loss_of_counts(
        token_counts(train_tokens, vocab_size), token_counts(val_tokens, vocab_size)
    )


def unigram_loss_of_counts(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """unigram_loss from the splits' token counts (which `hpcllm prepare` adds up over its ranks)."""
    log_probs = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    return float(-(val_counts * log_probs).sum() / max(1, val_counts.sum()))
