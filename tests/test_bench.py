"""Smoke runs of each benchmark at tiny sizes: the output format and the correctness column, never
the speed (speed is measured by `hpcllm bench`, recorded in docs/benchmarks.md)."""

import json

from conftest import TINY, run_hpcllm, sets

ALLREDUCE_ROW = {"engine", "bytes", "ranks", "time_us", "algbw_gbps", "busbw_gbps", "wrong"}


def test_bench_allreduce_rows_and_plot(tmp_path):
    plot = tmp_path / "allreduce.png"
    proc = run_hpcllm(
        ["bench", "allreduce", "--max-bytes", 4096, "--factor", 8, "--json", "--plot", plot], ranks=2
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["engine"] for r in rows} == {"horovod", "horovod-gloo", "mpi4py", "torch.distributed"}
    assert sorted({r["bytes"] for r in rows}) == [8, 64, 512, 4096]
    for row in rows:
        assert ALLREDUCE_ROW <= row.keys(), row
        assert row["ranks"] == 2 and row["wrong"] == 0 and row["time_us"] > 0, row
        assert abs(row["busbw_gbps"] - row["algbw_gbps"]) < 1e-9  # 2(n-1)/n = 1 at n = 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = run_hpcllm(["bench", "allreduce", "--max-bytes", 64, "--engines", "mpi4py"], ranks=2)
    assert table.returncode == 0, table.stderr
    assert "busbw" in table.stdout and "mpi4py" in table.stdout


def test_bench_train_scaling_rows_breakdown_and_timeline(data_dir, tmp_path):
    timeline = tmp_path / "timeline.json"
    # The benchmark sets its own logging and evaluation intervals.
    tiny = sets(*(a for a in TINY[1::2] if not a.startswith(("train.log_every", "train.eval"))))
    proc = run_hpcllm(
        ["bench", "train", "--data", data_dir, "--steps", 30, "--variants", "a1,c,d", "--json"]
        + tiny
        + sets("train.global_batch=4")
        + ["--sweep", "parallel.reduce_every=1", "--timeline", timeline],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["rows"]
    assert [r["key"] for r in rows] == ["a1", "c", "d", "c"]
    for row in rows:
        assert {"name", "ranks", "tokens_per_s", "mfu"} <= row.keys()
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"], row
        assert row["min"] <= row["tokens_per_s"] <= row["max"]
        assert {"data", "forward", "backward", "optimizer"} <= row["phase_ms"].keys(), row
    hpcllm_dp2 = rows[1]
    assert hpcllm_dp2["ranks"] == 2 and "allreduce" in hpcllm_dp2["phase_ms"]
    assert hpcllm_dp2["scaling_efficiency"] > 0 and rows[0]["scaling_efficiency"] is None
    assert "parallel.reduce_every=1" in rows[3]["name"]
    assert "c/d (hpcllm dp=2 vs DDP gloo, target >= 1.0)" in result["ratios"]
    # Horovod writes its timeline as a JSON array of trace events (rank 0 of the extra run).
    assert '"name": "process_name"' in timeline.read_text()[:2000]


def test_bench_pipeline_table(tmp_path):
    proc = run_hpcllm(["bench", "pipeline", "--pp", "2", "--micro", "2", "--steps", 1, "--json"])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert {r["schedule"] for r in results} == {"gpipe", "1f1b"}
    for r in results:
        assert 0 <= r["idle_mean"] < 1 and r["peak_activation_mb_max"] > 0, r


MEMORY_ROW = {
    "layout",
    "zero",
    "recompute",
    "sequence_parallel",
    "params_bytes",
    "grads_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "peak_bytes",
    "predicted_activation_bytes",
    "step_ms",
}


def test_bench_memory_rows():
    proc = run_hpcllm(["bench", "memory", "--dp", 4, "--vocab", 64, "--steps", 1, "--json", *TINY])
    assert proc.returncode == 0, proc.stderr
    rows = {(r["recompute"], r["zero"]): r for r in json.loads(proc.stdout)}
    assert set(rows) == {(mode, zero) for mode in ("none", "selective", "full") for zero in (0, 1, 2, 3)}
    assert all(set(r) == MEMORY_ROW for r in rows.values())
    for row in rows.values():  # the formula holds to 10% (it is within 1% on these shapes)
        assert abs(row["activation_bytes"] / row["predicted_activation_bytes"] - 1) < 0.1, row
    none, full = rows["none", 0], rows["full", 0]
    assert full["activation_bytes"] < none["activation_bytes"]
    assert rows["none", 1]["optimizer_bytes"] * 4 == none["optimizer_bytes"] == 2 * none["params_bytes"]
    # Fully sharded: a quarter of the weights and gradients, plus the units whole at once (in this
    # two-block model those are nearly all of it: the weights are not smaller, the gradients are).
    assert rows["none", 3]["grads_bytes"] < none["grads_bytes"]
    assert rows["none", 3]["peak_bytes"] < rows["none", 1]["peak_bytes"]
    bad = run_hpcllm(["bench", "memory", "--dp", 0])
    assert bad.returncode == 2 and "--dp >= 1" in bad.stderr
    budget = ["bench", "memory", "--dp", 4, "--vocab", 64, "--steps", 1, "--json", *TINY, "--budget-gb", 0.01]
    largest = {(r["recompute"], r["zero"]): r for r in json.loads(run_hpcllm(budget).stdout)["largest"]}
    # Sharding the optimizer state and recomputing activations each leave room for more layers.
    assert largest["none", 0]["n_layer"] < largest["none", 1]["n_layer"] < largest["full", 1]["n_layer"]
    assert largest["none", 1]["n_layer"] < largest["none", 3]["n_layer"]
    assert largest["none", 0]["n_layer"] <= largest["full", 0]["n_layer"]
