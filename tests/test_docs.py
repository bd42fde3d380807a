"""The documented commands work as written: README.md's command blocks and docs/training.md's
walkthrough are run line by line, as bash runs them, from an empty folder.

The walkthrough runs exactly as printed. The README's blocks train without --steps, so they run
with HPCLLM_DEFAULTS naming a tiny model and a few steps (the documented way to set defaults under
every run; the command lines are untouched), with the inputs a reader brings (my_corpus/, web/,
code/, prompts.txt) in the folder. A few lines cannot run here and are skipped by exact text,
each with its reason and the test that covers it instead.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_corpus

from hpcllm.cluster.launcher import launch_env
from hpcllm.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SKIPPED = {
    "source .venv/bin/activate": "the folder is empty: the venv's bin is put on PATH instead",
    "srun --mpi=pmix hpcllm train ...": "needs a Slurm allocation (test_slurm.py runs srun in one)",
    "hpcllm slurm submit --nodes 2 --partition gpu -- --data data/mine --tp 4": "needs a GPU partition; "
    "test_slurm.py submits to a real Slurm cluster",
    "hpcllm plan calibrate": "minutes of benchmarks (test_plan.py calibrates with fewer steps); its "
    "profile is written into the folder's config home instead",
    "tensorboard --logdir runs/": "a server that does not exit (test_train.py reads the events back)",
}

TINY_DEFAULTS = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {
        "steps": 6,
        "global_batch": 8,
        "micro_batch": 2,
        "log_every": 1,
        "eval_every": 3,
        "eval_steps": 1,
        "ckpt_every": 3,
        "peak_flops": 1e9,
    },
}


def bash_blocks(markdown: Path, heading: str) -> str:
    """The ```bash blocks of the section under `heading` (up to the next heading of its level)."""
    text = markdown.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading))
    section = text[start : end if end != -1 else len(text)]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def script_of(commands: str) -> str:
    """One bash script: each line echoed, then run; a failing line ends it (set -e)."""
    lines = ["set -euo pipefail"]
    for line in commands.splitlines():
        command = line.split("  #")[0].strip()  # the trailing comments of these blocks
        if not command or command.startswith("#"):
            continue
        if command in SKIPPED:
            lines.append(f"echo {quote('skipped: ' + command)}")
            continue
        lines += [f"echo {quote('$ ' + command)}", command]
    return "\n".join(lines) + "\n"


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def run_script(script: str, folder: Path, env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    ran = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert proc.returncode == 0, (
        f"failed: {ran[-1] if ran else '?'}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


def documented_env(folder: Path) -> dict[str, str]:
    env = launch_env() | {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env["XDG_CONFIG_HOME"] = str(folder / ".config")  # `plan calibrate` writes the local profile here
    return env


def test_the_training_walkthrough_runs_as_written(tmp_path):
    commands = bash_blocks(ROOT / "docs" / "training.md", "## A first run, step by step")
    assert commands.count("hpcllm") >= 8
    run_script(script_of(commands), tmp_path, documented_env(tmp_path), timeout=600)
    assert (tmp_path / "compare.png").exists() and (tmp_path / "hf" / "first" / "config.json").exists()
    assert (tmp_path / "runs" / "first" / "checkpoints" / "latest").read_text().strip() == "step-00000040"


def bring_inputs(folder: Path) -> None:
    """What a README reader brings: a text folder, JSONL shards, code, prompts; and the local
    profile that the skipped `hpcllm plan calibrate` would have measured."""
    import zstandard

    from hpcllm.planner import profiles

    write_corpus(folder / "my_corpus")
    write_corpus(folder / "code")
    (folder / "web").mkdir()
    for shard in range(2):
        texts = [
            (folder / "my_corpus" / f"f{i:02d}.txt").read_text() for i in range(shard * 20, shard * 20 + 20)
        ]
        lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
        (folder / "web" / f"part{shard}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (folder / "prompts.txt").write_text("def \nreturn self\nx = 1\n")
    local = folder / ".config" / "hpcllm" / "profiles" / "local.yaml"
    local.parent.mkdir(parents=True)
    from test_plan import CPU_NODE

    local.write_text(yaml.safe_dump(dataclasses.asdict(dataclasses.replace(CPU_NODE, name=profiles.LOCAL))))
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_DEFAULTS))


@pytest.mark.parametrize(
    "heading", ["## Running", "## Hugging Face, generation and TensorBoard"], ids=["running", "hf"]
)
def test_the_readme_commands_run_as_written(heading, readme_folder):
    commands = bash_blocks(ROOT / "README.md", heading)
    env = documented_env(readme_folder) | {"HPCLLM_DEFAULTS": str(readme_folder / "tiny.yaml")}
    run_script(script_of(commands), readme_folder, env, timeout=900)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """One folder for the README's blocks, in order: the Hugging Face block uses runs/first."""
    folder = tmp_path_factory.mktemp("readme")
    bring_inputs(folder)
    return folder


def test_defaults_file_sits_under_the_command_line_and_is_not_reapplied_on_resume(tmp_path, monkeypatch):
    from hpcllm.training import config

    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": {"steps": 6, "lr": 1e-3}}))
    monkeypatch.setenv("HPCLLM_DEFAULTS", str(tmp_path / "d.yaml"))
    mine = config.load(assignments=["train.lr=2e-3"])
    assert (mine.train.steps, mine.train.lr) == (6, 2e-3)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": {"steps": 9}}))
    assert config.load(base=mine.to_dict()).train.steps == 6  # a saved run keeps what it ran with
    monkeypatch.setenv("HPCLLM_DEFAULTS", str(tmp_path / "missing.yaml"))
    with pytest.raises(UsageError, match="HPCLLM_DEFAULTS file .*missing.yaml does not exist"):
        config.load()
