"""TensorBoard event files of a run (`train.tensorboard = true`): the scalars of metrics.jsonl, in
RUN/tensorboard, for `tensorboard --logdir runs/`. Rank 0 writes them, as it writes metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcllm.errors import EnvironmentProblem

SUBDIR = "tensorboard"
# metrics.jsonl key -> TensorBoard tag; train and val loss share a section so they chart side by side.
TAGS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps",
    "tokens_per_s": "speed/tokens_per_s",
    "mfu": "speed/mfu",
    "accuracy": "eval/accuracy",
    "accuracy_norm": "eval/accuracy_norm",
}


def check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise EnvironmentProblem(
            "train.tensorboard = true needs the tensorboard package: pip install tensorboard "
            "(or pip install 'hpcllm[tensorboard]')"
        )


class TensorBoardLog:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what the earlier attempt wrote past its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(run_dir / SUBDIR), purge_step=start_step + 1 if start_step else None)

    def append(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, tag in TAGS.items():
            value = row.get(key)
            if isinstance(value, int | float) and value == value:  # not NaN
                self.writer.add_scalar(tag, value, step)
        for phase, ms in row.get("phase_ms", {}).items():
            self.writer.add_scalar(f"phase_ms/{phase}", ms, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
