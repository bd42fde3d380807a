"""`make gpu-check`: on a GPU node, check hpcllm's CUDA path end to end and write one JSON report.

    1. the build: torch, CUDA, NCCL, the GPUs, bf16, whether Horovod is there and built with NCCL;
    2. the GPU tests (`pytest -m gpu`): TP / PP / DP equivalence on the GPUs present, one rank per GPU;
    3. `hpcllm train` of gpt2-124m, then of llama3.2-1b (block 2048), in bf16 on one GPU: tokens/s
       and MFU against the bf16 matmul peak measured here and against the vendor's dense bf16 peak;
    4. `hpcllm bench allreduce` over NCCL across the GPUs (needs two or more);
    5. `hpcllm bench checkpoint` on one GPU: what a checkpoint costs the steps, written before
       training goes on or in the background (`train.async_checkpoint`, `auto` picks the latter on GPUs).

Each part records what it found or why it was skipped; the script exits 1 when a part failed.
Runs with the repository's .venv or any Python that has torch (PYTHONPATH is set to the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
VENDOR_BF16_PEAK = {
    "H100 SXM": 989.4e12,  # NVIDIA H100 Tensor Core GPU data sheet, SXM5
    "H100 PCIe": 756.5e12,  # same data sheet, PCIe
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,  # NVIDIA H200 data sheet (same compute as H100 SXM)
    "A100": 312e12,  # NVIDIA A100 data sheet
    "L40S": 362.05e12,
}


def vendor_peak(name: str) -> float | None:
    """The data-sheet peak for a device name as torch reports it ("NVIDIA H100 80GB HBM3", ...)."""
    if "H100" in name:
        return VENDOR_BF16_PEAK[
            "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
        ]
    for key, peak in VENDOR_BF16_PEAK.items():
        if key in name:
            return peak
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def build() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        report["bf16"] = torch.cuda.is_bf16_supported()
    try:
        import horovod.torch as hvd

        report["horovod"] = {"nccl_built": bool(hvd.nccl_built()), "mpi_built": bool(hvd.mpi_built())}
    except ImportError as exc:
        report["horovod"] = {"missing": str(exc), "effect": "data-parallel runs (dp > 1) are skipped"}
    return report


def gpu_tests(timeout: float) -> dict[str, Any]:
    proc = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests"], timeout)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "summary": summary, "output_tail": proc.stdout[-4000:]}


def train_bf16(
    steps: int, micro_batch: int, timeout: float, preset: str = "gpt2-124m", extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    import torch

    from hpcllm.observe.metrics import measure_matmul_peak

    device = torch.device("cuda", 0)
    measured = measure_matmul_peak(device, dtype=torch.bfloat16)
    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        command = [sys.executable, "-m", "hpcllm.cli", "train", "--out", str(out), "--steps", str(steps)]
        for setting in (
            f"model.preset={preset}",
            *extra,
            "train.dtype=bfloat16",
            f"train.micro_batch={micro_batch}",
            f"train.global_batch={micro_batch * 4}",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.log_every=10",
            f"train.peak_flops={measured}",
        ):
            command += ["--set", setting]
        proc = _run(command, timeout)
        if proc.returncode != 0:
            return {"returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r][1:]  # the first interval includes warm-up
    tokens_per_s = sorted(r["tokens_per_s"] for r in timed)[len(timed) // 2]
    mfu_measured = sorted(r["mfu"] for r in timed)[len(timed) // 2]
    peak = vendor_peak(name)
    return {
        "returncode": 0,
        "device": name,
        "tokens_per_s": tokens_per_s,
        "bf16_matmul_peak_measured": measured,
        "mfu_vs_measured_peak": mfu_measured,
        "vendor_dense_bf16_peak": peak,
        "mfu_vs_vendor_peak": mfu_measured * measured / peak if peak else None,
        "target": "mfu_vs_vendor_peak >= 0.45",
    }


def allreduce_nccl(gpus: int, timeout: float) -> dict[str, Any]:
    if gpus < 2:
        return {"skipped": f"{gpus} GPU: an allreduce needs two or more"}
    command = [sys.executable, "-m", "hpcllm.launcher", "-np", str(gpus), sys.executable, "-m", "hpcllm.cli"]
    proc = _run(command + ["bench", "allreduce", "--engines", "torch.distributed", "--json"], timeout)
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    return {"returncode": 0, "result": json.loads(proc.stdout)}


def checkpoint_cost(timeout: float) -> dict[str, Any]:
    proc = _run(
        [sys.executable, "-m", "hpcllm.cli", "bench", "checkpoint", "--repeat", "2", "--json"], timeout
    )
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    return {"returncode": 0, "result": json.loads(proc.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report (gpu-check.json)")
    parser.add_argument("--steps", type=int, default=60, help="training steps for the MFU figure (60)")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch (16)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per part (900)")
    args = parser.parse_args()

    import torch

    started = time.time()
    report: dict[str, Any] = {"build": build()}
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA device: nothing else to check here"
    else:
        report["gpu_tests"] = gpu_tests(args.timeout)
        report["train_gpt2_124m_bf16"] = train_bf16(args.steps, args.micro_batch, args.timeout)
        # The Llama family at a published shape (at a 2048-token context, the default corpus's
        # vocabulary): its rotary attention, RMSNorm and SwiGLU on the GPU.
        report["train_llama3_2_1b_bf16"] = train_bf16(
            args.steps, 4, args.timeout, "llama3.2-1b", ("model.block_size=2048",)
        )
        report["allreduce_nccl"] = allreduce_nccl(torch.cuda.device_count(), args.timeout)
        report["checkpoint_cost"] = checkpoint_cost(args.timeout)
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = [part for part, value in report.items() if isinstance(value, dict) and value.get("returncode")]
    if failed:
        print(f"gpu-check: failed: {', '.join(failed)} (details in {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
