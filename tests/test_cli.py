"""The `hpcllm` command: info, and bad input as one line with exit code 2."""

from conftest import run_hpcllm as run

from hpcllm.cluster.launcher import launch_env


def test_info_shows_horovod_with_pytorch_mpi_and_gloo():
    proc = run(["info"])
    assert proc.returncode == 0, proc.stderr
    for line in (
        "[X] PyTorch",
        "[X] MPI",
        "[X] Gloo",
        "thread level MPI_THREAD_MULTIPLE",
        "OK: hpcllm can train",
    ):
        assert line in proc.stdout


def test_info_under_mpirun_shows_every_rank():
    proc = run(["info"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "Launcher: mpirun (OpenMPI); 2 ranks on 1 node(s)" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]


def test_bad_arguments_give_one_line_and_exit_2():
    for args in (["info", "--bogus"], ["no-such-command"], []):
        proc = run(args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], (args, proc.stderr)


def test_world_that_does_not_factor_exits_2_naming_the_numbers():
    proc = run(["info", "--tp", "2"], ranks=3)
    assert proc.returncode == 2
    assert "hpcllm info: error: world size 3 is not divisible by tp*pp = 2*1 = 2" in proc.stderr
    # Only rank 0 speaks: the line appears once, not once per rank.
    assert proc.stderr.count("not divisible") == 1


def test_info_shows_each_ranks_grid_place():
    proc = run(["info", "--tp", "2"], ranks=4)
    assert proc.returncode == 0, proc.stderr
    assert "grid pp=1 x dp=2 x tp=2" in proc.stdout
    places = [line.split()[-3:] for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert places == [["0", "0", "0"], ["0", "0", "1"], ["0", "1", "0"], ["0", "1", "1"]]


def test_info_exits_1_with_the_fix_when_horovod_lacks_pytorch(tmp_path):
    # A Horovod whose PyTorch extension was not built (what a build without HOROVOD_WITH_PYTORCH
    # gives), shadowing the real one: building such a Horovod here would take minutes.
    fake = tmp_path / "horovod"
    (fake / "torch").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.28.1'\n")
    (fake / "torch" / "__init__.py").write_text(
        "raise ImportError('Extension horovod.torch has not been built')\n"
    )
    env = launch_env()
    env["PYTHONPATH"] = str(tmp_path)
    proc = run(["info"], env=env)
    assert proc.returncode == 1
    assert "Extension horovod.torch has not been built" in proc.stdout
    assert "hpcllm info: horovod.torch missing" in proc.stderr and "make setup" in proc.stderr


def test_benchmarks_refuse_settings_that_measure_nothing():
    for args, needle in (
        (["bench", "train", "--steps", "5"], "--steps >= 30"),
        (["bench", "train", "--repeat", "0"], "--repeat >= 1"),
        (["bench", "pipeline", "--steps", "0"], "--steps must be at least 1"),
        (["bench", "pipeline", "--pp", "x"], "--pp takes comma-separated integers"),
        (["bench", "train", "--variants", "a,x"], "--variants: unknown x"),
        (["bench", "train", "--sweep", "horovod.nope=1,2"], "unknown config key 'horovod.nope'"),
        (["bench", "train", "--sweep", "horovod.cycle_time_ms"], "--sweep expects KEY=VALUE1,VALUE2"),
        (["bench", "prepare", "--ranks", "1"], "--ranks >= 2"),
        (["bench", "prepare", "--ranks", "4096"], "this process may use only"),
        (["bench", "memory", "--set", "parallel.cp=2"], "hpcllm bench context --cp 1,2"),
    ):
        proc = run(args)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
