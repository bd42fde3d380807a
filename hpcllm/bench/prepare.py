"""`hpcllm bench prepare`: how `hpcllm prepare` scales with ranks and with the input's size.

Runs, side by side in one invocation, with one core per rank: a run of n ranks is confined to n
cores (its CPU affinity), so the tokenizer's own threads do not hide the ranks' scaling:

- one synthetic JSONL file of `small_mb` and one of `large_mb` (10x by default) on one rank, and
  the large one on `ranks` ranks: time ratios and the peak memory of every rank;
- the default corpus (the Python standard library) on one rank and on `ranks` ranks, `repeat`
  times alternated (a run of half a minute varies by 10-20% on a shared machine, the one-rank run
  most: the ratio is that of the two configurations' median times, and the pairs' own ratios are
  reported with it);
- after each pair, the machine's own ceiling for that ratio: one process encoding the first 8 MB
  of the default corpus against `ranks` processes, on a core each, encoding a share each at once
  (no MPI, no I/O, no serial step), so a ratio below target can be told apart from a machine
  whose cores slow each other down;
- the ceiling per rank: the HF tokenizer's own batch encoding on one core (`encode_batch_fast`,
  the call prepare makes; `encode_batch`, which also computes character offsets, beside it), over
  the large file's first records in prepare's batches, with the tokenizer that prepare trained,
  the best of two alternated rounds.

The synthetic records are Zipf-distributed words of a fixed random vocabulary, seeded: the same
file every time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hpcllm.cluster.launcher import launch_command, launch_env, run_launched
from hpcllm.data import corpus
from hpcllm.data import tokenizer as tok
from hpcllm.data.prepare import BATCH_BYTES
from hpcllm.parallel.tasks import largest_first

SCALING_TARGET = 1.8  # `ranks` ranks over one, on the large file and the default corpus
LINEAR_TARGET = 10.5  # time of 10x the input over the small input's time, at most
MEMORY_FLAT = 0.2  # peak memory per rank, large over small, within this
MACHINE_MB = 8  # of the default corpus, encoded alone and shared out: the machine's own ratio


def synthetic_jsonl(path: Path, megabytes: float, seed: int = 0) -> Path:
    """A JSONL file of about `megabytes` MB of records {"text": ...}, written a block at a time."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(1, 11))) for _ in range(20_000)])
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.3, size=(512, 200)) - 1, len(words) - 1)
            block = "".join(json.dumps({"text": " ".join(words[row])}) + "\n" for row in ids)
            f.write(block)
            written += len(block)
    return path


def _prepare(source: str | None, ranks: int, out: Path) -> dict[str, Any]:
    """The run's JSON summary, plus the tokenizer it trained."""
    command = [*launch_command(ranks), sys.executable, "-m", "hpcllm.cli", "prepare"]
    command += ([source] if source else []) + ["--out", str(out), "--json"]
    with _on_cores(ranks):
        stdout = run_launched(command, f"prepare on {ranks} rank(s)", env=launch_env(), timeout=3600)
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary["tokenizer_json"] = (out / "tokenizer.json").read_text()
    shutil.rmtree(out)
    return summary


@contextmanager
def _on_cores(count: int) -> Iterator[None]:
    """This process and what it starts meanwhile run on the first `count` cores it may use."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:count])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _ceiling(source: Path, tokenizer_json: str, megabytes: float, rounds: int = 2) -> dict[str, float]:
    """Tokens/s of the tokenizer's own batch encoding on one core, over the file's first records in
    batches of prepare's size: `encode_batch_fast` (what prepare calls) and `encode_batch` (offsets
    computed too), alternated `rounds` times, the best of each kept (a ceiling)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # before the tokenizers library starts its thread pool
    tokenizer = tok.Tokenizer.from_str(tokenizer_json)
    batches: list[list[str]] = [[]]
    size = batch_size = 0
    with open(source) as f:
        for line in f:
            batches[-1].append(json.loads(line)["text"])
            size, batch_size = size + len(line), batch_size + len(line)
            if size >= megabytes * 1e6:
                break
            if batch_size >= BATCH_BYTES:
                batches.append([])
                batch_size = 0
    result: dict[str, float] = {"megabytes": size / 1e6}
    for _ in range(rounds):
        for name, encode in (("", tokenizer.encode_batch_fast), ("with_offsets_", tokenizer.encode_batch)):
            start = time.perf_counter()
            tokens = sum(len(e.ids) for batch in batches for e in encode(batch))
            seconds = time.perf_counter() - start
            if seconds < result.get(f"{name}seconds", float("inf")):
                result |= {f"{name}tokens": tokens, f"{name}seconds": seconds}
                result[f"{name}tokens_per_s"] = tokens / seconds
    return result


def _default_corpus_shares(megabytes: float, count: int) -> list[list[str]]:
    """The default corpus's first documents, `megabytes` in all, read as prepare reads them and
    dealt into `count` shares of about equal size (largest first, each to the least loaded)."""
    files = corpus.default_corpus_files()
    texts: list[str] = []
    found = corpus.Documents(Counter())
    for piece in corpus.pieces(files):
        if sum(len(t) for t in texts) >= megabytes * 1e6:
            break
        texts += [text for _, text in corpus.read_piece(files[piece.file], piece, "text", found)]
    shares: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in largest_first([len(t) for t in texts]):
        least = loads.index(min(loads))
        loads[least] += len(texts[index])
        shares[least].append(texts[index])
    return shares


def _encode_share(tokenizer_json: str, core: int, texts: list[str], start: Any, results: Any) -> None:
    """A spawned process on `core`: encodes `texts`, one call per document as prepare does for a
    file, once every process of the round is ready."""
    os.sched_setaffinity(0, {core})
    os.environ[tok.PARALLELISM] = "false"
    tokenizer = tok.Tokenizer.from_str(tokenizer_json)
    start.wait()
    began = time.perf_counter()
    for text in texts:
        tokenizer.encode_batch_fast([text])
    results.put(time.perf_counter() - began)


def machine_scaling(tokenizer_json: str, ranks: int, megabytes: float = MACHINE_MB) -> float:
    """What this machine allows for `ranks` over one, with no MPI, I/O or serial step at all: the
    time of one process encoding `megabytes` of the default corpus over that of `ranks` processes,
    on a core each, encoding a share each at the same time."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0))[:ranks]
    seconds = {}
    for count in (1, ranks):
        start, results = context.Barrier(count), context.Queue()
        workers = [
            context.Process(target=_encode_share, args=(tokenizer_json, core, texts, start, results))
            for core, texts in zip(cores, _default_corpus_shares(megabytes, count), strict=False)
        ]
        for worker in workers:
            worker.start()
        seconds[count] = max(results.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
    return seconds[1] / seconds[ranks]


def run(small_mb: float, large_mb: float, ranks: int, workdir: str | None, repeat: int = 7) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-prepare-", dir=workdir) as tmp:
        root = Path(tmp)
        small = synthetic_jsonl(root / "small.jsonl", small_mb, seed=1)
        large = synthetic_jsonl(root / "large.jsonl", large_mb, seed=2)
        runs = {
            "small, 1 rank": _prepare(str(small), 1, root / "out"),
            "large, 1 rank": _prepare(str(large), 1, root / "out"),
            f"large, {ranks} ranks": _prepare(str(large), ranks, root / "out"),
        }
        pairs, machine = [], []
        for _ in range(repeat):
            pair = (_prepare(None, 1, root / "out"), _prepare(None, ranks, root / "out"))
            pairs.append((pair[0]["seconds"], pair[1]["seconds"]))
            runs["default corpus, 1 rank"], runs[f"default corpus, {ranks} ranks"] = pair  # the last pair
            machine.append(machine_scaling(pair[0]["tokenizer_json"], ranks))  # minutes apart, at most
        ceiling = _ceiling(large, runs["large, 1 rank"]["tokenizer_json"], 64)
    for summary in runs.values():
        del summary["tokenizer_json"]
    seconds = {name: r["seconds"] for name, r in runs.items()}
    large_one = runs["large, 1 rank"]
    return {
        "ranks": ranks,
        "small_mb": small_mb,
        "large_mb": large_mb,
        "runs": runs,
        "speedup_large": seconds["large, 1 rank"] / seconds[f"large, {ranks} ranks"],
        "speedup_default": statistics.median(one for one, _ in pairs)
        / statistics.median(n for _, n in pairs),
        "speedup_default_pairs": [one / n for one, n in pairs],
        "machine_scaling": statistics.median(machine),
        "machine_scaling_runs": machine,
        "default_seconds": {"1 rank": [one for one, _ in pairs], f"{ranks} ranks": [n for _, n in pairs]},
        "time_ratio_10x": seconds["large, 1 rank"] / seconds["small, 1 rank"],
        "size_ratio": large_one["bytes"] / runs["small, 1 rank"]["bytes"],
        "memory_ratio": max(large_one["peak_memory_mib"]) / max(runs["small, 1 rank"]["peak_memory_mib"]),
        "ceiling": ceiling,
        "tokens_per_s_per_rank": large_one["tokens"] / large_one["phases"]["tokenize"],
    }


def render(result: dict[str, Any]) -> str:
    ranks = result["ranks"]
    lines = [
        f"{'run':<26} {'MB':>8} {'tokens':>13} {'seconds':>8} {'tokenizer':>9} {'tokenize':>8} "
        f"{'write':>6} {'peak MiB/rank':>13}"
    ]
    for name, r in result["runs"].items():
        phases = r["phases"]
        lines.append(
            f"{name:<26} {r['bytes'] / 1e6:>8,.0f} {r['tokens']:>13,} {r['seconds']:>8.1f} "
            f"{phases.get('tokenizer', 0):>9.1f} {phases.get('tokenize', 0):>8.1f} "
            f"{phases.get('write', 0):>6.2f} {max(r['peak_memory_mib']):>13,.0f}"
        )
    ceiling, machine = result["ceiling"], result["machine_scaling_runs"]
    lines += [
        "",
        f"{ranks} ranks over 1, large file: {result['speedup_large']:.2f}x, default corpus: "
        f"{result['speedup_default']:.2f}x (median times of {len(result['speedup_default_pairs'])} "
        f"alternated runs each; the pairs' ratios {min(result['speedup_default_pairs']):.2f} - "
        f"{max(result['speedup_default_pairs']):.2f}; target >= {SCALING_TARGET}x)",
        f"the machine's own {ranks} cores over 1 meanwhile: {result['machine_scaling']:.2f}x (the median of "
        f"{len(machine)}: independent processes encoding {MACHINE_MB} MB of the default corpus, "
        f"{min(machine):.2f} - {max(machine):.2f}); prepare "
        f"reaches {result['speedup_default'] / result['machine_scaling']:.0%} of it",
        f"{result['size_ratio']:.1f}x the input in {result['time_ratio_10x']:.2f}x the time "
        f"(target <= {LINEAR_TARGET}x at 10x); peak memory per rank {result['memory_ratio']:.2f}x "
        f"(target within {MEMORY_FLAT:.0%})",
        f"tokenizing, per rank: {result['tokens_per_s_per_rank']:,.0f} tokens/s; the tokenizer's own "
        f"encode_batch_fast on one core: {ceiling['tokens_per_s']:,.0f} tokens/s "
        f"({result['tokens_per_s_per_rank'] / ceiling['tokens_per_s']:.0%} of the ceiling; "
        f"encode_batch, with offsets: {ceiling['with_offsets_tokens_per_s']:,.0f} tokens/s)",
    ]
    return "\n".join(lines)
