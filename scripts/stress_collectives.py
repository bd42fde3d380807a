"""Stress the mix of collectives a tp x dp run makes: many short runs of one layout, each with a
random gradient bucket size and Horovod cycle time, half of them with the machine loaded by busy
processes, every one under the stall watchdog. A run that stalls ends with exit 70 and every
rank's stack in its logs; its run directory is kept (hpcllm.cluster.launcher.failed_runs_dir).

    .venv/bin/python scripts/stress_collectives.py --runs 100 [--layout tp=2,dp=2] [--seed 1]

Prints one line per run and a tally; exits 1 if any run stalled or failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcllm.cluster.launcher import keep_failed_run, launch_env

SHAPES = {
    "small": [
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "model.block_size=64",
        "train.global_batch=16",
    ],
    # the shape `plan validate` ran when the stall was seen: the tiny preset, global batch 32
    "plan-validate": ["model.preset=tiny", "train.global_batch=32"],
}
BUCKETS_MB = (0.001, 0.01, 0.1, 25.0)
CYCLE_MS = (0.1, 1.0, 5.0)


def _burn(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def one_run(
    data: Path, work: Path, index: int, layout: dict[str, int], shape: list[str], rng: random.Random
) -> tuple[int, str]:
    bucket, cycle, loaded = rng.choice(BUCKETS_MB), rng.choice(CYCLE_MS), rng.random() < 0.5
    sets = [*shape, f"train.micro_batch={layout['micro_batch']}", f"parallel.bucket_mb={bucket}"]
    sets += [
        f"horovod.cycle_time_ms={cycle}",
        "train.watchdog_s=20",
        "train.eval_every=0",
        "train.ckpt_every=0",
    ]
    ranks = layout["tp"] * layout["dp"]
    out = work / f"run-{index}"
    command = [sys.executable, "-m", "hpcllm.launcher", "-np", str(ranks), sys.executable, "-m", "hpcllm.cli"]
    command += ["train", "--data", str(data), "--out", str(out), "--tp", str(layout["tp"]), "--steps", "30"]
    command += ["--quiet", *[item for s in sets for item in ("--set", s)]]
    burners = [multiprocessing.Process(target=_burn, args=(120,)) for _ in range(2 if loaded else 0)]
    for burner in burners:
        burner.start()
    started = time.time()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=240)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = -1
    finally:
        for burner in burners:
            burner.terminate()
    what = f"bucket {bucket} MB, cycle {cycle} ms, {'loaded' if loaded else 'idle'}"
    if code != 0:
        kept = keep_failed_run(out)
        what += f": exit {code}, kept in {kept}"
    return code, f"run {index}: {time.time() - started:5.1f} s, {what}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--layout", default="tp=2,dp=2,micro_batch=4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="small", help="the model and batch (small)"
    )
    parser.add_argument("--data", help="prepared data (default: a small byte-level corpus made here)")
    args = parser.parse_args()
    layout = {"micro_batch": 4} | {k: int(v) for k, v in (item.split("=") for item in args.layout.split(","))}
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="hpcllm-stress-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else _small_data(work)
        for index in range(args.runs):
            code, line = one_run(data, work, index, layout, SHAPES[args.shape], rng)
            failures += code != 0
            print(line, flush=True)
    print(f"{args.runs - failures} of {args.runs} runs ended normally; {failures} stalled or failed")
    return 1 if failures else 0


def _small_data(work: Path) -> Path:
    corpus = work / "corpus"
    corpus.mkdir()
    words = ["def", "return", "self", "rank", "(", ")", ":", "x", "=", "1", "tensor", "grad"]
    rng = random.Random(0)
    for i in range(40):
        (corpus / f"f{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    out = work / "data"
    command = [
        sys.executable,
        "-m",
        "hpcllm.cli",
        "prepare",
        str(corpus),
        "--tokenizer",
        "byte",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, env=launch_env())
    return out


if __name__ == "__main__":
    raise SystemExit(main())
