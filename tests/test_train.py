"""The main job: dp equivalence, replicas in step, resume, checkpoints, generate, bad input."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import TINY, assert_usage_error, losses, run_hpcllm, sets, train, write_corpus
from torch.overrides import TorchFunctionMode

WITHOUT_HOROVOD = (
    "import sys; sys.modules['horovod'] = None; from hpcllm.cli.__main__ import main; sys.exit(main())"
)


def test_dp2_matches_dp1_step_by_step(data_dir, tmp_path):
    """The dp = 1 run has no Horovod to import (a single GPU on a machine where it is not built)."""
    command = [sys.executable, "-c", WITHOUT_HOROVOD, "train", "--data", data_dir, "--out", tmp_path / "dp1"]
    one = subprocess.run([str(a) for a in command + [*TINY, "--steps", 20]], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # train.mmap_mb changes where memory comes from, not what is computed
    two = train(data_dir, tmp_path / "dp2", "--steps", 20, "--set", "train.mmap_mb=1", ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "dp1"), losses(tmp_path / "dp2")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert abs(a[1] - b[1]) <= 1e-5 * abs(a[1])
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-3 * abs(a[step]), step
    assert a[20] < a[1], "the loss must go down"
    assert "done: 20 steps" in one.stdout and "unigram baseline" in one.stdout
    peaks = json.loads((tmp_path / "dp2" / "memory.json").read_text())["peak_rss_mib"]
    assert len(peaks) == 2 and min(peaks) > 50 and "peak memory per rank" in two.stdout


@pytest.mark.mpi(ranks=2, timeout=240)
def test_replicas_stay_identical(mpi_tmp_path, comm):
    import hashlib

    from hpcllm.training.loop import TrainArgs, run_training

    data = prepare_in_ranks(mpi_tmp_path, comm)
    trainer = run_training(
        TrainArgs(set=tuple(TINY[1::2]), data=str(data), out=str(mpi_tmp_path / "run"), steps=6)
    )
    digest = hashlib.sha256()
    for _, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digests = comm.allgather(digest.hexdigest())
    assert digests[0] == digests[1], "DP replicas drifted apart"
    assert trainer.grid.layout.dp == 2
    # A step reads the device from the host once (loss and gradient norm together): on a GPU every
    # such read waits for the stream. Counted through torch's function hooks, on CPU.
    # torch's (unfused, CPU) AdamW reads its step counters, which PyTorch keeps on the CPU: exempt.
    steps = {id(state["step"]) for state in trainer.optimizer.state.values()}
    with HostReads(exempt=steps) as reads:
        trainer.train_step(6)
    assert reads.calls == ["tolist"], reads.calls
    # The loss and the gradient norm's sums travel together: one host collective over DP, none
    # over the TP and PP groups of one rank, nothing pickled.
    assert host_collectives(trainer, 7) == {"dp": ["Allreduce"], "tp": [], "pp": []}


@pytest.mark.mpi(ranks=4, timeout=240)
def test_one_host_collective_per_axis_at_tp2_pp2(mpi_tmp_path, comm):
    """pp 2 x tp 2 with sequence parallelism: the step's loss and norm cross TP once and the
    pipeline once (there were up to five blocking host collectives, pickled ones among them)."""
    from hpcllm.training.loop import TrainArgs, run_training

    data = prepare_in_ranks(mpi_tmp_path, comm)
    layout = ("parallel.sequence_parallel=true",)
    args = TrainArgs(
        set=(*TINY[1::2], *layout), data=str(data), out=str(mpi_tmp_path / "run"), steps=2, tp=2, pp=2
    )
    trainer = run_training(args)
    assert host_collectives(trainer, 2) == {"dp": [], "tp": ["Allreduce"], "pp": ["Allreduce"]}


def prepare_in_ranks(root, comm):
    """Inside the ranks everything runs in-process and collectively, prepare included."""
    from hpcllm.data.prepare import PrepareOptions, prepare

    if comm.Get_rank() == 0:
        write_corpus(root / "src")
    comm.Barrier()
    data = root / "data"
    prepare(PrepareOptions(sources=[str(root / "src")], out=data, tokenizer="byte"), comm, progress=False)
    return data


class CountingComm:
    """An mpi4py communicator that records the collectives called on it."""

    COLLECTIVES = {"allreduce", "bcast", "allgather", "gather", "scatter", "reduce", "alltoall", "barrier"}

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def __getattr__(self, name):
        attribute = getattr(self.comm, name)
        if name.lower().lstrip("i") not in self.COLLECTIVES:
            return attribute

        def counted(*args, **kwargs):
            self.calls.append(name)
            return attribute(*args, **kwargs)

        return counted


def host_collectives(trainer, step):
    """The host collectives one training step calls on the grid's DP, TP and PP communicators."""
    grid = trainer.grid
    real = {axis: getattr(grid, f"{axis}_comm") for axis in ("dp", "tp", "pp")}
    counting = {axis: CountingComm(comm) for axis, comm in real.items()}
    try:
        for axis, comm in counting.items():
            setattr(grid, f"{axis}_comm", comm)
        trainer.train_step(step)
    finally:
        for axis, comm in real.items():
            setattr(grid, f"{axis}_comm", comm)
    return {axis: comm.calls for axis, comm in counting.items()}


class HostReads(TorchFunctionMode):
    """Records the tensor methods that copy a value to the host (a device synchronisation on CUDA)."""

    READS = {"item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"}

    def __init__(self, exempt=frozenset()):
        super().__init__()
        self.calls, self.exempt = [], exempt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not (args and id(args[0]) in self.exempt):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    full = tmp_path / "full"
    proc = train(
        data_dir, full, "--steps", 12, *sets("train.ckpt_every=6", "train.keep=5", "train.tensorboard=true")
    )
    assert proc.returncode == 0, proc.stderr
    # A crash just after the step-6 checkpoint: later checkpoints and metrics never happened.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000012")
    (crashed / "checkpoints" / "latest").write_text("step-00000006\n")
    resumed = run_hpcllm(["train", "--out", crashed, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 12 steps (steps 7-12 in " in resumed.stdout, resumed.stdout  # the session's time
    a, b = losses(full), losses(crashed)
    assert [a[s] for s in range(7, 13)] == [b[s] for s in range(7, 13)]  # bitwise on CPU, same layout
    assert (crashed / "checkpoints" / "step-00000012" / "manifest.json").exists()
    # Resuming a finished run says it is complete and how to extend it.
    again = run_hpcllm(["train", "--out", crashed, "--resume"])
    assert again.returncode == 0 and "is complete" in again.stdout and "--steps N" in again.stdout, again
    assert "nan" not in again.stdout and sorted(losses(crashed)) == list(range(1, 13))
    # TensorBoard's own reader sees each step once, with the resumed run's values after step 6.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (full, crashed):
        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert {"loss/train", "loss/val", "train/lr", "train/grad_norm", "speed/tokens_per_s"} <= set(
            events.Tags()["scalars"]
        )
        assert any(tag.startswith("phase_ms/") for tag in events.Tags()["scalars"])
        train_loss = {e.step: e.value for e in events.Scalars("loss/train")}
        assert sorted(train_loss) == list(range(1, 13))
        assert train_loss == pytest.approx(losses(run), rel=1e-6)
    # Both runs in one picture and one table; an existing picture is kept unless --force.
    picture = tmp_path / "both.png"
    proc = run_hpcllm(["runs", "compare", full, crashed, "--out", picture])
    assert proc.returncode == 0, proc.stderr
    assert picture.stat().st_size > 0
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["run", "tp", "pp", "dp"] and [
        line.split()[:4] for line in table[1:3]
    ] == [
        ["full", "1", "1", "1"],
        ["crashed", "1", "1", "1"],
    ]
    assert f"{losses(full)[12]:.4f}" in table[1]
    # The resumed run's curve is the uninterrupted one's: said, since the plot would hide it.
    assert table[3] == "crashed: losses identical to full's (dashed in the plot)"
    assert_usage_error(run_hpcllm(["runs", "compare", full, "--out", picture]), "exists", "--force")
    assert_usage_error(
        run_hpcllm(["runs", "compare", tmp_path, "--out", tmp_path / "x.png"]), "metrics.jsonl"
    )


def test_resume_from_another_working_directory_and_after_the_data_moved(data_dir, tmp_path):
    """config.yaml keeps the data's absolute path, so `cd elsewhere && train --out /abs/run
    --resume` works; data that moved is named, with the fix (--data, checked to be the same data)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(data_dir, work / "data")
    command = ["train", "--data", "data", "--out", "run", *TINY, "--steps", 2, *sets("train.ckpt_every=1")]
    assert run_hpcllm(command, cwd=work).returncode == 0
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["data"]["path"] == str(work / "data")
    resumed = run_hpcllm(["train", "--out", work / "run", "--resume", "--steps", 3], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    (work / "data").rename(work / "moved")
    assert_usage_error(
        run_hpcllm(["train", "--out", work / "run", "--resume", "--steps", 4], cwd=elsewhere),
        f"the run's data {work / 'data'} is not there",
        "pass --data with its new place",
    )
    moved = ["train", "--out", work / "run", "--resume", "--steps", 4, "--data", work / "moved"]
    assert run_hpcllm(moved, cwd=elsewhere).returncode == 0
    assert sorted(losses(work / "run")) == [1, 2, 3, 4]


def test_resume_may_ramp_the_batch_but_not_change_seed_or_data(data_dir, tmp_path):
    """The sampler's position is samples consumed: a resume with a larger global batch continues
    where the run stopped. Another seed or other data would repeat and skip samples: refused."""
    run = tmp_path / "run"
    assert train(data_dir, run, "--steps", 2, "--set", "train.ckpt_every=2").returncode == 0
    ramped = tmp_path / "ramped"
    shutil.copytree(run, ramped)
    proc = run_hpcllm(["train", "--out", ramped, "--resume", "--steps", 4, "--set", "train.global_batch=16"])
    assert proc.returncode == 0, proc.stderr
    sampler = json.loads((ramped / "checkpoints" / "step-00000004" / "manifest.json").read_text())["sampler"]
    assert sampler["consumed_samples"] == 2 * 8 + 2 * 16 and sampler["seed"] == 1337

    proc = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4, "--set", "train.seed=7"])
    assert_usage_error(proc, "drew its data order with train.seed=1337, not 7")
    other = tmp_path / "other-data"
    prepared = run_hpcllm(
        ["prepare", data_dir.parent, "--tokenizer", "byte", "--val-ratio", 0.3, "--out", other]
    )
    assert prepared.returncode == 0, prepared.stderr
    proc = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4, "--data", other])
    assert_usage_error(proc, f"--resume: {other} is not the data this run was trained on")
    assert "[rank" not in proc.stderr  # refused before the run's logging started
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"  # nothing written


@pytest.mark.mpi(ranks=1, timeout=120)
def test_checkpoint_round_trip_of_model_and_optimizer(mpi_tmp_path, comm):
    import torch

    from hpcllm.model.gpt import GPT, GPTShape
    from hpcllm.model.heads import lm_loss
    from hpcllm.parallel.grid import Grid
    from hpcllm.training import checkpoint

    shape = GPTShape(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 50, (2, 8))
    lm_loss(model(x), x).backward()
    optimizer.step()
    grid = Grid(comm)
    saved = checkpoint.save(mpi_tmp_path, 1, model, optimizer, grid, {"note": "test"}, keep=2)
    assert checkpoint.latest(mpi_tmp_path) == saved

    torch.manual_seed(1)
    fresh = GPT(shape)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    manifest = checkpoint.load(saved, fresh, fresh_opt, grid)
    assert manifest["step"] == 1 and manifest["note"] == "test"
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_opt.state[q][key]), key


def test_generate_from_a_fresh_checkpoint_single_and_task_parallel(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(data_dir, run, "--steps", 4).returncode == 0
    one = run_hpcllm(["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", 10])
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("def ") and len(one.stdout) > len("def ")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\nreturn self\nx = 1\nrank\ngrad tensor\n" + "def " * 40 + "\n")
    greedy = ["--temperature", 0]
    variants = {
        "g1": (None, []),
        "g2": (2, []),  # task-parallel over two replicas
        "g3": (None, ["--batch-size", 1, "--no-cache"]),  # one prompt at a time, no KV cache
        "t1": (None, greedy),
        "t2": (2, [*greedy, "--tp", 2]),  # one replica of two tensor-parallel ranks
    }
    for name, (ranks, extra) in variants.items():
        command = ["generate", "--run", run, "--prompts", prompts, "--max-new-tokens", 8]
        proc = run_hpcllm([*command, "--output", tmp_path / f"{name}.jsonl", *extra], ranks=ranks)
        assert proc.returncode == 0, proc.stderr
        if name == "t2":  # a log line, on standard error: standard output carries results only
            assert "MB of weights" not in proc.stdout, proc.stdout
            mine, whole = re.search(
                r"tp 2: ([\d.]+) MB of weights on each rank, of ([\d.]+) MB", proc.stderr
            ).groups()
            assert float(mine) < 0.6 * float(whole), proc.stdout  # about half: the norms are replicated
    rows = [json.loads(line) for line in (tmp_path / "g1.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts.read_text().splitlines()
    # Seeded per prompt: the same text whichever rank or batch sampled it, with or without the cache
    # (the last prompt is longer than block_size: its context slides).
    text = (tmp_path / "g1.jsonl").read_text()
    assert text == (tmp_path / "g2.jsonl").read_text() == (tmp_path / "g3.jsonl").read_text()
    assert (tmp_path / "t1.jsonl").read_text() == (tmp_path / "t2.jsonl").read_text()


# ---- bad input: one line, exit 2, nothing overwritten --------------------------------------


def test_unknown_config_key_suggests_the_nearest(data_dir, tmp_path):
    proc = train(data_dir, tmp_path / "r", "--set", "train.learning_rate=1e-3")
    assert_usage_error(proc, "unknown config key 'train.learning_rate'")
    proc = train(data_dir, tmp_path / "r", "--set", "model.n_embed=64")
    assert_usage_error(proc, "did you mean model.n_embd?")
    assert not (tmp_path / "r").exists()


def test_progress_lines_when_not_on_a_terminal_and_none_with_quiet(data_dir, tmp_path):
    """Under sbatch standard error is a file: rank 0 writes a line every train.log_every steps
    (step of total, loss, lr, tokens/s, MFU, elapsed, time left) and the validation loss; --quiet
    keeps only the start-up lines and the summary."""
    flags = ["--steps", 4, *sets("train.log_every=2", "train.eval_every=4")]
    shown = train(data_dir, tmp_path / "shown", *flags, ranks=2)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if "step " in line and "/4 |" in line]
    assert [line.split("step ")[1].split(" ")[0] for line in lines] == ["1/4", "2/4", "4/4", "4/4"], lines
    assert all(key in lines[1] for key in ("loss ", "lr ", "tok/s", "MFU ", "elapsed ", "left ")), lines
    assert "val loss" in lines[-1] and "[rank 1]" not in "".join(lines)
    quiet = train(data_dir, tmp_path / "quiet", *flags, "--quiet", ranks=2)
    assert quiet.returncode == 0 and "/4 |" not in quiet.stderr, quiet.stderr
    assert losses(tmp_path / "quiet") == losses(tmp_path / "shown")


def test_n_embd_not_divisible_by_n_head(data_dir, tmp_path):
    proc = train(data_dir, tmp_path / "r", "--set", "model.n_embd=30", "--set", "model.n_head=4")
    assert_usage_error(proc, "model.n_embd 30 is not divisible by model.n_head 4")


def test_global_batch_not_divisible_by_dp_times_micro_batch(data_dir, tmp_path):
    proc = train(data_dir, tmp_path / "r", "--set", "train.global_batch=6", ranks=2)
    assert proc.returncode == 2
    assert "train.global_batch 6 is not divisible by dp × train.micro_batch = 2 × 2 = 4" in proc.stderr
    assert proc.stderr.count("is not divisible") == 1  # rank 0 speaks for all
    assert not (tmp_path / "r").exists()


def test_data_pointing_to_nothing_prepared(tmp_path):
    proc = run_hpcllm(["train", "--data", tmp_path / "nothing", "--out", tmp_path / "r", *TINY])
    assert_usage_error(proc, "holds no prepared data", "hpcllm prepare")
    assert not (tmp_path / "r").exists()


def test_out_holding_a_run_is_refused_without_resume_and_kept(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(data_dir, run, "--steps", 2).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_usage_error(train(data_dir, run, "--steps", 2), "already holds a run", "--resume")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_with_an_incompatible_model_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(data_dir, run, "--steps", 2).returncode == 0
    before = (run / "metrics.jsonl").read_bytes()
    proc = run_hpcllm(["train", "--out", run, "--resume", "--set", "model.n_layer=3"])
    assert_usage_error(proc, "trained with model.n_layer=2, not 3")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_fp16_compression_and_bf16_autocast_train_close_to_fp32(data_dir, tmp_path):
    reference = train(data_dir, tmp_path / "fp32", "--steps", 10, ranks=2)
    assert reference.returncode == 0, reference.stderr
    lossy = train(
        data_dir,
        tmp_path / "mixed",
        "--steps",
        10,
        "--set",
        "parallel.grad_compression=fp16",
        "--set",
        "train.dtype=bfloat16",
        ranks=2,
    )
    assert lossy.returncode == 0, lossy.stderr
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "mixed")
    assert a != b, "compression and autocast must actually change the arithmetic"
    for step in a:
        assert abs(a[step] - b[step]) <= 0.05 * a[step], step


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.eval_steps=0", "train.eval_steps must be at least 1"),
        ("train.log_every=0", "train.log_every must be at least 1"),
        ("train.lr=-1", "train.lr must be positive"),
        ("train.warmup=-5", "train.warmup must be 0 or more"),
        ("train.watchdog_s=-1", "train.watchdog_s must be 0 or more"),
        ("horovod.cycle_time_ms=-1", "horovod.cycle_time_ms must be 0 (auto) or more"),
        ("horovod.fusion_threshold_mb=-1", "horovod.fusion_threshold_mb must be 0 or more"),
        ("train.dtype=float16", "train.dtype must be float32 or bfloat16"),
        ("model.preset=gpt5", "unknown model.preset 'gpt5'"),
        ("train.steps=ten", "train.steps must be an int, not 'ten'"),
        ("parallel.tp_backend=nccl", "parallel.tp_backend must be auto, mpi4py, horovod or torch"),
        ("horovod.controller=nccl", "horovod.controller must be auto, mpi or gloo"),
        ("parallel.pp_backend=horovod", "parallel.pp_backend must be auto, mpi4py or torch"),
        ("train.recompute=some", "train.recompute must be none, selective or full, not some"),
    ],
)
def test_out_of_range_training_settings(data_dir, tmp_path, assignment, message):
    assert_usage_error(train(data_dir, tmp_path / "r", "--set", assignment), message)
    assert not (tmp_path / "r").exists()


def test_allreduce_every_micro_batch_gives_the_same_losses_and_a_timeline(data_dir, tmp_path):
    """parallel.reduce_every=1 allreduces after each of the 2 micro-batches per rank
    instead of once per step: the same arithmetic up to rounding. --timeline records Horovod."""
    once = train(data_dir, tmp_path / "once", "--steps", 6, ranks=2)
    assert once.returncode == 0, once.stderr
    timeline = tmp_path / "timeline.json"
    every = train(
        data_dir,
        tmp_path / "every",
        "--steps",
        6,
        "--set",
        "parallel.reduce_every=1",
        "--timeline",
        timeline,
        ranks=2,
    )
    assert every.returncode == 0, every.stderr
    a, b = losses(tmp_path / "once"), losses(tmp_path / "every")
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert "NEGOTIATE_ALLREDUCE" in timeline.read_text()
    every_rows = [
        r for r in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines() if "phase_ms" in r
    ]
    row = json.loads(every_rows[-1])
    assert {"data", "forward", "backward", "allreduce", "optimizer"} <= row["phase_ms"].keys()
    # The phases are parts of the step: together they cannot exceed its wall time, and the work
    # phases cannot be empty.
    step_ms = 1000 * (row["elapsed_s"] - json.loads(every_rows[-2])["elapsed_s"])
    assert sum(row["phase_ms"].values()) <= step_ms * 1.05 + 1, (row["phase_ms"], step_ms)
    assert min(row["phase_ms"][k] for k in ("forward", "backward", "optimizer")) > 0


def test_reduce_every_must_divide_the_micro_batches_and_the_old_key_still_works(data_dir, tmp_path):
    """parallel.reduce_every was horovod.backward_passes_per_step: the old key works for a release,
    with a one-line deprecation note."""
    proc = train(data_dir, tmp_path / "run", "--set", "parallel.reduce_every=3", ranks=2)
    assert proc.returncode == 2, proc.stderr
    assert "parallel.reduce_every 3 does not divide the 2 micro-batches" in proc.stderr
    assert not (tmp_path / "run").exists()
    old = train(data_dir, tmp_path / "run", "--set", "horovod.backward_passes_per_step=3")
    assert old.returncode == 2, old.stderr
    assert "horovod.backward_passes_per_step is deprecated and goes in the next release: use " in old.stderr
    assert "parallel.reduce_every 3 does not divide the 4 micro-batches" in old.stderr
    assert not (tmp_path / "run").exists()


def test_flags_keep_their_types_and_the_plan_is_checked_once_and_frozen(tmp_path):
    """Flags reach the config as typed values, not as YAML text (a data directory named `yes` or
    `1e3` stays a path); the plan resolves the default data path itself and cannot be changed."""
    import dataclasses

    from hpcllm.errors import UsageError
    from hpcllm.training import config as config_mod
    from hpcllm.training.loop import TrainArgs
    from hpcllm.training.plan import default_data_dir, make_plan

    for name in ("yes", "1e3", "null"):
        args = TrainArgs(data=name, timeline=str(tmp_path / "on"), steps=7)
        config = config_mod.load(None, ["train.global_batch=16"], overrides=args.overrides())
        assert (config.data.path, config.horovod.timeline, config.train.steps) == (
            name,
            str(tmp_path / "on"),
            7,
        )
    plan = make_plan(config_mod.load(None, ["parallel.tp=2", "parallel.pp=2"]), world=8)
    assert (plan.layout.pp, plan.layout.dp, plan.layout.tp) == (2, 2, 2)
    assert plan.micro_batches == 32 // (2 * 8) and plan.allreduce_every == plan.micro_batches
    assert plan.config.data.path == str(default_data_dir()) and plan.default_data
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config.train.steps = 1
    with pytest.raises(UsageError, match="world size 6 is not divisible by tp\\*pp"):
        make_plan(config_mod.load(None, ["parallel.tp=2", "parallel.pp=2"]), world=6)
    # mpi4py hands device buffers to MPI only when it is CUDA-aware (this Open MPI is not).
    for key in ("tp_backend", "pp_backend"):
        with pytest.raises(UsageError, match=f"parallel.{key}=mpi4py on CUDA needs a CUDA-aware MPI"):
            make_plan(config_mod.load(None, [f"parallel.{key}=mpi4py"]), world=1, device_type="cuda")
    on_gpu = make_plan(config_mod.load(None, []), world=4, device_type="cuda")
    on_cpu = make_plan(config_mod.load(None, []), world=4, device_type="cpu")
    assert (on_gpu.tp_backend, on_gpu.pp_backend, on_cpu.tp_backend, on_cpu.pp_backend) == (
        "torch",
        "torch",
        "mpi4py",
        "mpi4py",
    )


def test_warmup_scales_with_the_run_unless_given_and_a_run_of_only_warmup_is_warned():
    """The default warmup is a tenth of train.steps (40 of the default 400), so `--steps 40`
    still decays; a saved run keeps its warmup when extended; a warmup as long as the run is
    warned about when the run starts."""
    from hpcllm.training import config as cfg
    from hpcllm.training.optim import learning_rate, schedule_warning

    short = cfg.load(overrides={"train.steps": 40})
    assert (cfg.load().train.warmup, short.train.warmup) == (40, 4)
    assert learning_rate(39, short.train) < learning_rate(4, short.train) == short.train.lr
    extended = cfg.load(base=short.to_dict(), overrides={"train.steps": 400})
    assert extended.train.warmup == 4 and schedule_warning(extended.train) is None
    only_warmup = cfg.load(assignments=["train.warmup=40"], overrides={"train.steps": 40})
    assert "train.warmup (40) is not shorter than train.steps (40)" in schedule_warning(only_warmup.train)
