"""`hpcllm bench packing`: trained tokens per second of fine-tuning samples of mixed lengths, packed
several to a row (data.packing = true) against one per row, padded (false), side by side.

The samples are synthetic prompt/completion records whose lengths are drawn log-uniformly between
a few tokens and the block (byte tokenizer: a character is a token), so that most rows of the padded
run are mostly padding, as with real instruction data. Both variants train the same model for the
same steps in fresh processes, interleaved `repeat` times; the figure is the median over the logged
steps after the first of `trained_tokens_per_s` (targets the loss counts, per second).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.cluster.launcher import run_launched
from hpcllm.data.packing import PackedSamples
from hpcllm.data.tokens import open_prepared

VARIANTS = {"packed": "true", "padded": "false"}


def mixed_records(path: Path, count: int, block: int, seed: int = 0) -> Path:
    """Prompt/completion records, each prompt + completion between 8 and `block` characters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    lengths = np.exp(rng.uniform(np.log(8), np.log(block), size=count)).astype(int)
    with open(path, "w") as f:
        for length in lengths:
            text = "".join(rng.choice(letters, size=length))
            cut = int(length) // 2
            f.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
    return path


def _hpcllm(*args: Any) -> list[str]:
    return [sys.executable, "-m", "hpcllm.cli", *[str(a) for a in args]]


def _trained_tokens_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["trained_tokens_per_s"] for row in rows[1:] if "trained_tokens_per_s" in row)


def run(steps: int, repeat: int, block: int, records: int, model: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hpcllm-packing-") as tmp:
        work = Path(tmp)
        source = mixed_records(work / "records.jsonl", records, block)
        data = work / "data"
        prepare = _hpcllm("prepare", source, "--format", "sft", "--tokenizer", "byte", "--out", data)
        run_launched([*prepare, "--max-tokens", str(block + 1)], "bench packing: preparing the samples")
        split = open_prepared(data)
        packed = PackedSamples.of_split(split, "train", block, packing=True)
        fill = float(packed.positions_used.sum()) / (packed.n_sequences * block)
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        sets = [f"model.block_size={block}", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0"]
        for index in range(repeat):  # interleaved: slow drifts of the machine hit both alike
            for name, packing in VARIANTS.items():
                out = work / f"{name}-{index}"
                keys = [*sets, *model, f"data.packing={packing}"]
                flags = [item for key in keys for item in ("--set", key)]
                command = _hpcllm("train", "--data", data, "--out", out, "--steps", steps, "--quiet", *flags)
                run_launched(command, f"bench packing: training {name}")
                rates[name].append(_trained_tokens_per_s(out))
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "block_size": block,
        "samples": packed.positions_used.size,
        "rows_packed": packed.n_sequences,
        "fill_packed": fill,
        "trained_tokens_per_s": median,
        "all": rates,
        "ratio": median["packed"] / median["padded"],
    }


def render(result: dict[str, Any]) -> str:
    rates = result["trained_tokens_per_s"]
    return "\n".join(
        [
            f"{result['samples']:,} samples of mixed lengths into rows of {result['block_size']} positions: "
            f"{result['rows_packed']:,} rows packed ({result['fill_packed']:.0%} full), "
            f"{result['samples']:,} padded",
            f"  trained tokens/s  packed {rates['packed']:,.0f}   padded {rates['padded']:,.0f}",
            f"packed / padded: {result['ratio']:.2f}",
        ]
    )
