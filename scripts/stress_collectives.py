"""Stress the mix of collectives a tp x dp run makes: many short runs of one layout, each with a
random gradient bucket size and Horovod cycle time, half of them with the machine loaded by busy
processes, every one under the stall watchdog. A run that stalls ends with exit 70 and every
rank's stack in its logs; its run directory is kept (hpcllm.cluster.launcher.failed_runs_dir).

    .venv/bin/python scripts/stress_collectives.py --runs 100 [--layout tp=2,dp=2] [--seed 1]

Prints one line per run and a tally; exits 1 if any run stalled or failed.

`--micro SECONDS` instead hammers, in one launch of that layout, the three threads of each rank
that use MPI at once, far faster than training does: the main thread's tensor-parallel allreduces
(mpi4py) run while Horovod's background thread reduces over the data-parallel process set, and the
watchdog's thread sends its reports; every result is checked, and a stall ends the job with every
rank's Python and native stacks, kept in failed_runs_dir(). `--controller mpi|gloo` picks Horovod's
(auto: gloo on one host). `--micro SECONDS --mpi-only` leaves Horovod out: three threads per rank
make blocking MPI allreduces at once, each on a communicator of its own, as the threads of a tp x dp
rank on the MPI controller can.
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
from typing import Any

import torch

from hpcllm.cluster.launcher import failed_runs_dir, keep_failed_run, launch_env

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
    data: Path,
    work: Path,
    index: int,
    layout: dict[str, int],
    shape: list[str],
    rng: random.Random,
    controller: str,
) -> tuple[int, str]:
    bucket, cycle, loaded = rng.choice(BUCKETS_MB), rng.choice(CYCLE_MS), rng.random() < 0.5
    sets = [*shape, f"train.micro_batch={layout['micro_batch']}", f"parallel.bucket_mb={bucket}"]
    sets += [
        f"horovod.cycle_time_ms={cycle}",
        f"horovod.controller={controller}",
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


HVD_SIZES = (1, 64, 4096, 65536, 1 << 20)  # float32 elements of a Horovod reduction
TP_SIZES = (1, 256, 16384, 262144)  # of a tensor-parallel allreduce


def micro_rank(layout: dict[str, int], seconds: float, seed: int, watchdog_s: float, controller: str) -> None:
    """One rank of `--micro`: iterations of Horovod reductions in flight over the DP set while the
    main thread runs TP allreduces, then a world agreement to go on (as training's stop signal)."""
    import numpy as np
    from mpi4py import MPI

    from hpcllm.cluster import watchdog
    from hpcllm.parallel import horovod as horovod_start
    from hpcllm.parallel.grid import Grid

    comm, shared = MPI.COMM_WORLD, random.Random(seed)  # the same structure on every rank
    jitter = random.Random(seed * 1000 + comm.Get_rank())  # each rank's own timing
    knobs = horovod_start.environment(shared.choice(BUCKETS_MB), shared.choice(CYCLE_MS))
    grid = Grid(comm, tp=layout["tp"], horovod=True, horovod_env=knobs, horovod_controller=controller)
    watchdog.start(comm, watchdog_s)
    hvd, dp, tp = grid.hvd, grid.layout.replicas, grid.layout.tp
    end, counts, go = time.time() + seconds, [0, 0, 0], np.ones(1, dtype=np.int32)
    while go[0]:
        watchdog.set_step(counts[0])
        sizes = [shared.choice(HVD_SIZES) for _ in range(shared.randint(1, 6))]
        tensors = [torch.full((n,), float(grid.dp_rank + 1)) for n in sizes]
        handles = [
            hvd.allreduce_async_(t, name=f"stress.{i}", op=hvd.Sum, process_set=grid.dp_process_set)
            for i, t in enumerate(tensors)
        ]
        for _ in range(shared.randint(0, 8)):
            x = np.full(shared.choice(TP_SIZES), grid.tp_rank + 1.0, dtype=np.float32)
            with watchdog.waiting("tensor-parallel allreduce"):
                grid.tp_comm.Allreduce(MPI.IN_PLACE, x)
            assert x[0] == x[-1] == tp * (tp + 1) / 2, f"a wrong TP sum {x[0]}"
            counts[2] += 1
            if jitter.random() < 0.3:
                time.sleep(jitter.random() * 0.002)
        with watchdog.waiting("gradient reduction (Horovod)"):
            for handle, t in zip(handles, tensors, strict=True):
                hvd.synchronize(handle)
                assert t[0] == t[-1] == dp * (dp + 1) / 2, f"a wrong Horovod sum {t[0]}"
        counts[0], counts[1] = counts[0] + 1, counts[1] + len(tensors)
        go[0] = 1 if comm.Get_rank() != 0 else int(time.time() < end)
        with watchdog.waiting("stop-signal agreement"):
            comm.Allreduce(MPI.IN_PLACE, go, op=MPI.MIN)
    watchdog.stop()
    if comm.Get_rank() == 0:
        print(
            f"{counts[0]} iterations, {counts[1]} Horovod reductions, {counts[2]} TP allreduces per rank "
            f"in {seconds:.0f} s; Horovod on {grid.horovod_controller}, knobs {knobs}",
            flush=True,
        )


def mpi_threads_rank(seconds: float, seed: int, stall_s: float = 30.0) -> None:
    """One rank of `--micro --mpi-only`: MPI alone, no Horovod: three threads each make blocking
    allreduces on a communicator of their own (pairs along TP, pairs along DP, a duplicate of the
    world, as Horovod's negotiation uses) at once, sums checked; the main thread polls MPI as the
    watchdog does and, if no thread has finished a call for `stall_s`, writes every thread's Python
    and native stacks and aborts with 70."""
    import faulthandler
    import threading

    import numpy as np
    from mpi4py import MPI

    from hpcllm.cluster.watchdog import native_stacks

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    comms = {"tp": world.Split(rank // 2, rank), "dp": world.Split(rank % 2, rank), "world": world.Dup()}
    poll, counts, stop = world.Dup(), dict.fromkeys(comms, 0), threading.Event()

    def calls(name: str, comm: Any, order: int) -> None:
        shared, jitter = random.Random(seed * 7 + order), random.Random(seed * 1000 + rank)
        size = comm.Get_size()
        while True:
            x = np.full(shared.choice(TP_SIZES), comm.Get_rank() + 1.0, dtype=np.float32)
            comm.Allreduce(MPI.IN_PLACE, x)
            assert x[0] == x[-1] == size * (size + 1) / 2, f"a wrong {name} sum {x[0]}"
            counts[name] += 1
            if jitter.random() < 0.2:
                time.sleep(jitter.random() * 0.001)
            if counts[name] % 200 == 0:  # the communicator's ranks agree on stopping
                flag = np.array([stop.is_set()], dtype=np.int32)
                comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
                if flag[0]:
                    return

    threads = [
        threading.Thread(target=calls, args=(n, c, i), daemon=True) for i, (n, c) in enumerate(comms.items())
    ]
    for thread in threads:
        thread.start()
    end, last, changed = time.time() + seconds, dict(counts), time.time()
    while any(thread.is_alive() for thread in threads):
        time.sleep(1.0)
        poll.Iprobe()
        if time.time() > end:
            stop.set()
        if counts != last:
            last, changed = dict(counts), time.time()
        elif time.time() - changed > stall_s:
            print(f"[rank {rank}] stalled: no MPI call finished for {stall_s:.0f} s; {counts}", flush=True)
            faulthandler.dump_traceback(all_threads=True)
            print(native_stacks(), flush=True)
            world.Abort(70)
    if rank == 0:
        print(f"{sum(counts.values())} allreduces per rank by 3 threads at once {counts} in {seconds:.0f} s")


def micro(args: argparse.Namespace, layout: dict[str, int]) -> int:
    ranks = layout["tp"] * layout["dp"]
    command = [sys.executable, "-m", "hpcllm.launcher", "-np", str(ranks), sys.executable, __file__]
    command += ["--micro-rank", str(args.micro), "--layout", args.layout, "--seed", str(args.seed)]
    command += ["--controller", args.controller] + (["--mpi-only"] if args.mpi_only else [])
    burners = [multiprocessing.Process(target=_burn, args=(args.micro + 60,)) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=launch_env(), timeout=args.micro + 300
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -1, f"timed out: {exc}"
    finally:
        for burner in burners:
            burner.terminate()
    print(out.strip().splitlines()[-1] if code == 0 else f"seed {args.seed}: exit {code}", flush=True)
    if code != 0:
        kept = failed_runs_dir() / f"stress-micro-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(out)
        print(f"its output, with every rank's stacks, is in {kept}")
    return 0 if code == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=float, help="seconds of the threads' stress in one launch")
    parser.add_argument("--micro-rank", type=float, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mpi-only", action="store_true", help="--micro without Horovod: three threads in MPI collectives"
    )
    parser.add_argument("--burners", type=int, default=0, help="--micro: busy processes beside it (0)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--layout", default="tp=2,dp=2,micro_batch=4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--controller", choices=("auto", "mpi", "gloo"), default="auto", help="horovod.controller (auto)"
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="small", help="the model and batch (small)"
    )
    parser.add_argument("--data", help="prepared data (default: a small byte-level corpus made here)")
    args = parser.parse_args()
    layout = {"micro_batch": 4} | {k: int(v) for k, v in (item.split("=") for item in args.layout.split(","))}
    if args.micro_rank and args.mpi_only:
        mpi_threads_rank(args.micro_rank, args.seed)
        return 0
    if args.micro_rank:
        micro_rank(layout, args.micro_rank, args.seed, watchdog_s=20, controller=args.controller)
        return 0
    if args.micro:
        return micro(args, layout)
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="hpcllm-stress-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else _small_data(work)
        for index in range(args.runs):
            code, line = one_run(data, work, index, layout, SHAPES[args.shape], rng, args.controller)
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
