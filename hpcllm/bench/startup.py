"""`hpcllm bench startup`: time from launch to the end of the first step, for token files of
different sizes. A start-up that reads the whole dataset (hashing it, counting tokens, building a
permutation) grows with it; hpcllm's should not.

Each size gets a synthetic prepared directory (random byte-level tokens, written in chunks, with a
valid manifest: checksums and the unigram baseline are computed here, as `hpcllm prepare` does),
then `hpcllm train --steps 1` is launched in a fresh process and timed, `repeat` times, interleaved.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.cluster.launcher import launch_command, run_launched
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import FORMAT_VERSION, MANIFEST, TOKENIZER, checksum_of, unigram_loss

CHUNK_TOKENS = 1 << 26  # 128 MB of uint16 per write
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]


def synthetic_data(out: Path, gigabytes: float, seed: int = 0) -> Path:
    """A prepared directory whose train split holds `gigabytes` GB of random byte-level tokens."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tok.byte_tokenizer()
    vocab = tokenizer.get_vocab_size()
    rng = np.random.default_rng(seed)
    sizes = {"train": int(gigabytes * 1e9) // 2, "val": 1 << 16}
    for split, tokens in sizes.items():
        with open(out / f"{split}.bin", "wb") as f:
            for start in range(0, tokens, CHUNK_TOKENS):
                count = min(CHUNK_TOKENS, tokens - start)
                rng.integers(0, vocab - 1, size=count, dtype=np.uint16).tofile(f)
    tokenizer.save(str(out / TOKENIZER))
    train, val = (np.memmap(out / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val"))
    manifest = {
        "format": FORMAT_VERSION,
        "created_by": "hpcllm bench startup (synthetic)",
        "tokenizer": {
            "kind": "byte",
            "vocab_size": vocab,
            "eot_id": tok.eot_id(tokenizer),
            "file": TOKENIZER,
        },
        "dtype": "uint16",
        "seed": seed,
        "val_ratio": 0.0,
        "split_by": "tokens",
        "unigram_loss": unigram_loss(train, val, vocab),
        "splits": {
            split: {
                "file": f"{split}.bin",
                "tokens": tokens,
                "documents": 1,
                "checksum": checksum_of(out / f"{split}.bin"),
            }
            for split, tokens in sizes.items()
        },
        "sources": ["synthetic"],
        "files": {
            "read": 0,
            "pieces": 0,
            "skipped_not_utf8": 0,
            "skipped_empty": 0,
            "bad_jsonl_records": 0,
            "bad_jsonl_by_kind": {},
            "not_utf8": [],
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _time_to_first_step(data: Path, ranks: int, work: Path, index: int) -> float:
    sets = [
        item for key in [*TINY_MODEL, "train.eval_every=0", "train.ckpt_every=0"] for item in ("--set", key)
    ]
    command = [sys.executable, "-m", "hpcllm.cli", "train", "--data", str(data), "--steps", "1"]
    command += ["--out", str(work / f"run-{data.name}-{index}"), *sets]
    if ranks > 1:
        command = launch_command(ranks) + command
    start = time.perf_counter()
    run_launched(command, f"bench startup: training on {data}")
    return time.perf_counter() - start


def run(
    gigabytes: list[float], ranks: int = 2, repeat: int = 3, workdir: str | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hpcllm-startup-", dir=workdir) as tmp:
        work = Path(tmp)
        datasets = [synthetic_data(work / f"data-{gb:g}GB", gb) for gb in gigabytes]
        times: dict[float, list[float]] = {gb: [] for gb in gigabytes}
        for index in range(repeat):  # interleaved, so slow drifts of the machine hit every size
            for gb, data in zip(gigabytes, datasets, strict=True):
                times[gb].append(_time_to_first_step(data, ranks, work, index))
    rows = [{"gigabytes": gb, "seconds": sorted(ts)[len(ts) // 2], "all": ts} for gb, ts in times.items()]
    return {"rows": rows, "ranks": ranks, "ratio": rows[-1]["seconds"] / rows[0]["seconds"]}


def render(result: dict[str, Any]) -> str:
    lines = [f"time from launch to the end of step 1 ({result['ranks']} ranks; median of the runs)"]
    lines.append("  train split   seconds   runs")
    for row in result["rows"]:
        runs = ", ".join(f"{s:.1f}" for s in row["all"])
        lines.append(f"  {row['gigabytes']:>7g} GB  {row['seconds']:>8.1f}   {runs}")
    lines.append(f"largest / smallest: {result['ratio']:.2f}")
    return "\n".join(lines)
