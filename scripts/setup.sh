#!/usr/bin/env bash
# hpcllm setup: system MPI/Slurm packages, .venv, torch, mpi4py, Horovod (built once, wheel cached).
#
# Idempotent: a second run checks what is there and finishes in seconds. Every step logs to
# .venv/setup-logs/STEP.log; a failing step prints the end of its log, then one line naming the
# step and the fix, so the last thing on screen is what to do.
#
# Knobs (environment):
#   HPCLLM_PYTHON        interpreter for the venv            (default: python3)
#   HPCLLM_TORCH         pip spec for torch                  (default: torch==2.13.0, the CPU wheel;
#                        on a GPU cluster e.g. "torch==2.5.1 --index-url <your CUDA wheel index>",
#                        or "skip" to keep the torch already in the venv)
#   HPCLLM_CACHE         wheel cache outside the repository  (default: ~/.cache/hpcllm)
#   HPCLLM_SKIP_APT=1    never call apt-get (clusters: load your MPI module instead)
#   HOROVOD_GPU_OPERATIONS=NCCL and friends are passed through to the Horovod build; on a GPU node
#                        with a CUDA torch, NCCL is chosen by itself (see gpu_build_env).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${HPCLLM_PYTHON:-python3}"
TORCH_SPEC="${HPCLLM_TORCH:-torch==2.13.0}"
HOROVOD_VERSION="0.28.1"
CACHE="${HPCLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcllm}"
LOGS="$VENV/setup-logs"
STAMP="$VENV/.hpcllm-setup"

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

# run STEP FIX CMD...: run CMD with its output in the step's log; on failure show the log's tail
# and end on one line naming the step and the fix.
run() {
    local step="$1" fix="$2"; shift 2
    mkdir -p "$LOGS"
    local log="$LOGS/$step.log"
    if ! "$@" >"$log" 2>&1; then
        echo "---- last lines of $log ----" >&2
        tail -n 15 "$log" >&2
        echo "----" >&2
        printf '\033[1;31msetup failed at step "%s".\033[0m Fix: %s (full log: %s)\n' "$step" "$fix" "$log" >&2
        exit 1
    fi
}

fingerprint() {
    # Anything that changes what setup installs invalidates the stamp.
    { cat "$ROOT/setup.cfg" "$ROOT/scripts/setup.sh"; echo "$TORCH_SPEC"; } | sha256sum | cut -c1-16
}

# ---- 1. system packages -------------------------------------------------------------------
apt_install() {
    local missing=("$@")
    if [ "${HPCLLM_SKIP_APT:-0}" = 1 ]; then
        echo "setup: missing system packages: ${missing[*]}; HPCLLM_SKIP_APT=1 so not installing them." >&2
        echo "Fix: load your site's MPI module (module load openmpi) or install: ${missing[*]}" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "setup: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
        sudo="sudo"
    fi
    say "installing system packages: ${missing[*]}"
    run apt-update "check network access to the Debian mirrors, or install ${missing[*]} yourself" \
        $sudo apt-get update -q
    run apt-install "apt-get install ${missing[*]} by hand and read its error" \
        env DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

system_packages() {
    local need=()
    command -v mpicc >/dev/null || need+=(openmpi-bin libopenmpi-dev)
    command -v mpirun >/dev/null || need+=(openmpi-bin)
    # Slurm and munge run the real one-node cluster the Slurm tests start; optional elsewhere.
    if [ "${HPCLLM_SKIP_SLURM:-0}" != 1 ]; then
        command -v slurmctld >/dev/null || need+=(slurm-wlm)
        command -v munged >/dev/null || need+=(munge)
    fi
    command -v cmake >/dev/null || need+=(cmake)
    command -v g++ >/dev/null || need+=(g++)
    # gdb: the stall watchdog writes every thread's native stack (inside MPI, Horovod) with it.
    command -v gdb >/dev/null || need+=(gdb)
    if ((${#need[@]})); then
        mkdir -p "$VENV"
        # shellcheck disable=SC2207
        need=($(printf '%s\n' "${need[@]}" | sort -u))
        apt_install "${need[@]}"
    fi
}

# ---- 2. the virtual environment -----------------------------------------------------------
make_venv() {
    if [ ! -x "$PY" ]; then
        say "creating .venv with $($PYTHON --version 2>&1)"
        run venv "install python3-venv (apt-get install python3-venv) or set HPCLLM_PYTHON" \
            "$PYTHON" -m venv "$VENV"
    fi
    run pip-tools "check that PyPI is reachable (pip config list shows the index)" \
        "$PY" -m pip install -q --upgrade pip setuptools wheel
}

python_packages() {
    if [ "$TORCH_SPEC" != skip ]; then
        say "installing $TORCH_SPEC"
        # shellcheck disable=SC2086
        run torch "set HPCLLM_TORCH to a torch spec your machine can install (see README: GPU clusters)" \
            "$PY" -m pip install -q $TORCH_SPEC
    fi
    say "installing mpi4py (against $(command -v mpicc)) and the Python dependencies"
    # --no-binary keeps mpi4py linked against the system MPI, not a bundled one.
    run mpi4py "mpi4py must compile against your MPI: check that mpicc works (mpicc --version)" \
        env MPICC="$(command -v mpicc)" "$PY" -m pip install -q --no-binary mpi4py "mpi4py>=3.1"
    # Horovod's own runtime requirements, needed before its --no-build-isolation build.
    run build-deps "check that PyPI is reachable" \
        "$PY" -m pip install -q numpy cloudpickle psutil pyyaml packaging
}

# ---- 3. Horovod, built once against this torch and cached --------------------------------
horovod_wheel_dir() {
    local tag
    tag="$("$PY" -c 'import sys, torch; v = torch.__version__.replace("+", "-"); print(f"torch{v}-cp{sys.version_info[0]}{sys.version_info[1]}")')" \
        || { echo "setup: torch is not importable in .venv; fix: rerun make setup (or check HPCLLM_TORCH)" >&2; exit 1; }
    echo "$CACHE/wheels/horovod-$HOROVOD_VERSION-$tag${HOROVOD_GPU_OPERATIONS:+-gpu-$HOROVOD_GPU_OPERATIONS}"
}

horovod_ok() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import os
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
assert os.environ.get("HOROVOD_GPU_OPERATIONS") != "NCCL" or hvd.nccl_built()
EOF
}

# On a GPU node (nvidia-smi and a CUDA build of torch), Horovod's GPU operations use NCCL. Without a
# system CUDA toolkit, pip's nvidia-cuda-nvcc / nvidia-cuda-runtime packages (matching torch's CUDA
# major version) provide nvcc and the headers, and torch's own nvidia-nccl wheel provides NCCL.
gpu_build_env() {
    if [ -z "${HOROVOD_GPU_OPERATIONS:-}" ] && command -v nvidia-smi >/dev/null \
        && "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        export HOROVOD_GPU_OPERATIONS=NCCL
    fi
    [ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ] || return 0
    if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
        local major runtime
        major="$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')"
        run cuda-toolkit "check that PyPI is reachable, or load your site's CUDA module and rerun" \
            "$PY" -m pip install -q "nvidia-cuda-nvcc-cu$major" "nvidia-cuda-runtime-cu$major"
        CUDA_HOME="$("$PY" -c 'import os, nvidia.cuda_nvcc as m; print(os.path.dirname(m.__file__))')"
        runtime="$("$PY" -c 'import os, nvidia.cuda_runtime as m; print(os.path.dirname(m.__file__))')"
        export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CPATH="$runtime/include${CPATH:+:$CPATH}"
    fi
    local nccl
    if nccl="$("$PY" -c 'import os, nvidia.nccl as m; print(os.path.dirname(m.__file__))' 2>/dev/null)"; then
        export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$nccl/lib" HOROVOD_NCCL_LINK=SHARED
    fi
    say "GPU node: building Horovod with NCCL (CUDA_HOME=${CUDA_HOME:-system})"
}

build_horovod() {
    local out="$1" src
    src="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$src'" RETURN
    say "building Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo (once; about 8 minutes on 2 cores)"
    run horovod-download "check that PyPI is reachable" \
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src"
    tar -xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src"
    local tree="$src/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; Horovod 0.28.1 still asks for C++14 (fixed upstream, unreleased).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$tree/CMakeLists.txt" "$tree/horovod/torch/CMakeLists.txt"
    mkdir -p "$out"
    # cmake 4.x refuses Gloo's old cmake_minimum_required; the policy floor keeps it building.
    run horovod-build "read the log; a compiler error usually means a torch/Horovod mismatch (HPCLLM_TORCH)" \
        env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$out" "$tree"
}

horovod() {
    gpu_build_env
    if horovod_ok; then return; fi
    local dir
    dir="$(horovod_wheel_dir)"
    if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
        build_horovod "$dir"
    else
        say "installing Horovod from the cached wheel in $dir"
    fi
    run horovod-install "delete $dir and run setup again to rebuild" \
        "$PY" -m pip install -q --force-reinstall --no-deps "$dir"/horovod-*.whl
    horovod_ok || {
        echo "setup: Horovod installed but lacks PyTorch, MPI or Gloo. Fix: rm -rf $dir and rerun make setup" >&2
        exit 1
    }
}

# ---- 4. hpcllm itself ---------------------------------------------------------------------
hpcllm() {
    say "installing hpcllm (editable) and its dependencies"
    run hpcllm "read the log: a dependency of setup.cfg could not be installed" \
        "$PY" -m pip install -q --no-build-isolation -e "$ROOT[dev]"
}

main() {
    local fp
    fp="$(fingerprint)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fp" ] && command -v mpirun >/dev/null \
        && horovod_ok && "$PY" -c 'import hpcllm, mpi4py' 2>/dev/null; then
        say "up to date (.venv)"
        return
    fi
    system_packages
    make_venv
    python_packages
    horovod
    hpcllm
    echo "$fp" >"$STAMP"
    say "done: $("$PY" -c 'import torch, mpi4py, horovod; print(f"torch {torch.__version__}, mpi4py {mpi4py.__version__}, horovod {horovod.__version__}")')"
}

main "$@"
