"""Draw docs/img/package-map.png: hpcllm's packages, their modules, and which package imports which.

Generated from the code (the imports are read with `ast`), so the picture cannot drift from it:
run `python scripts/package_map.py` after moving modules. A package sits above everything it
imports; an arrow A -> B means a module of A imports one of B.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hpcllm"

# What each package owns, in a few words (shown under its name).
ROLES = {
    "cluster": "who am I and where: launcher, runtime, Slurm, watchdog, preemption, faults",
    "parallel": "layout + grid (every group, eagerly), sharding, Horovod, data parallel, task pool",
    "parallel/tensor": "TP collectives, mappings (autograd comm), layers, vocab-parallel loss",
    "parallel/pipeline": "stage partition, point-to-point, GPipe / 1F1B schedules",
    "model": "the GPT, written once; its TP partition; GPT-2 folders; KV-cache generation",
    "training": "config, the validated plan, trainer, loop, optimizer, checkpoints, export",
    "data": "corpus -> tokenizer -> token files + manifest; the O(1) sampler; node-local staging",
    "observe": "metrics.jsonl, loss.png, MFU, phase timer, TensorBoard, runs compare",
    "cli": "one module per command",
    "bench": "train, allreduce, pipeline, memory, startup, generate benchmarks",
    "planner": "step time and memory of a layout, cluster profiles, search, calibration",
    "testing": "the pytest plugin shipped to users",
    "errors": "exit codes 2 and 1",
}


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) == 1:
        return parts[0]  # a top-level module (errors, launcher)
    if parts[0] == "parallel" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0]


def module_package(name: str) -> str | None:
    """hpcllm.parallel.tensor.layers -> parallel/tensor; None outside hpcllm."""
    parts = name.split(".")
    if parts[0] != "hpcllm" or len(parts) < 2:
        return None
    candidate = PACKAGE.joinpath(*parts[1:])
    path = (
        candidate.with_suffix(".py") if candidate.with_suffix(".py").exists() else candidate / "__init__.py"
    )
    return package_of(path) if path.exists() else None


def read_graph() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    modules: dict[str, list[str]] = defaultdict(list)
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(path)
        if path.name not in ("__init__.py", "__main__.py"):
            modules[source].append(path.stem)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                target = module_package(name)
                # errors.py is imported nearly everywhere: its arrows would only hide the others.
                if target and target not in (source, "launcher", "errors"):
                    edges[source].add(target)
    modules.pop("launcher", None)  # the `python -m hpcllm.launcher` entry point only
    edges.pop("launcher", None)
    return dict(modules), dict(edges)


def floors(packages: list[str], edges: dict[str, set[str]]) -> dict[str, int]:
    level: dict[str, int] = {}

    def depth(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in level:
            return level[name]
        if name in seen:  # an import cycle: drawn on one floor
            return 0
        below = [depth(t, (*seen, name)) for t in edges.get(name, ()) if t in packages]
        level[name] = 1 + max(below, default=-1)
        return level[name]

    for name in packages:
        depth(name)
    return level


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    modules, edges = read_graph()
    packages = sorted(modules)
    level = floors(packages, edges)
    rows: dict[int, list[str]] = defaultdict(list)
    for name in packages:
        rows[level[name]].append(name)
    width, height = 3.3, 1.35
    place: dict[str, tuple[float, float]] = {}
    top = max(rows)
    for floor, names in rows.items():
        names.sort(key=lambda n: (-len(edges.get(n, ())), n))
        span = len(names) * (width + 0.5)
        for i, name in enumerate(names):
            place[name] = (i * (width + 0.5) - span / 2 + width / 2, floor * (height + 1.1))
    fig, ax = plt.subplots(figsize=(17, 2.6 * (top + 1)))
    # Anchors spread over a box's edge, so that the arrows of one box do not start in one point.
    outgoing = {s: sorted(ts, key=lambda n: place[n][0]) for s, ts in edges.items()}
    incoming: dict[str, list[str]] = defaultdict(list)
    for source, targets in edges.items():
        for target in targets:
            incoming[target].append(source)
    for target in incoming:
        incoming[target].sort(key=lambda n: place[n][0])

    def spread(index: int, count: int) -> float:
        return (index + 1) / (count + 1) * width * 0.8 - width * 0.4

    for source, targets in outgoing.items():
        for i, target in enumerate(targets):
            (x0, y0), (x1, y1) = place[source], place[target]
            j = incoming[target].index(source)
            arrow = FancyArrowPatch(
                (x0 + spread(i, len(targets)), y0 - height / 2),
                (x1 + spread(j, len(incoming[target])), y1 + height / 2),
                arrowstyle="-|>",
                mutation_scale=12,
                color="#7a869a",
                alpha=0.55,
                lw=1.0,
                connectionstyle="arc3,rad=0.05",
            )
            ax.add_patch(arrow)
    palette = ["#dbe9f6", "#e3f1df", "#fbe8d3", "#efe1f5", "#fdf3c8", "#e0f0f0"]
    for name, (x, y) in place.items():
        box = FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.04",
            facecolor=palette[level[name] % len(palette)],
            edgecolor="#44546a",
            lw=1.2,
        )
        ax.add_patch(box)
        ax.text(
            x,
            y + height / 2 - 0.2,
            f"{name}/" if name != "errors" else "errors.py",
            ha="center",
            va="center",
            fontsize=11,
            weight="bold",
        )
        role = ROLES.get(name, "")
        ax.text(x, y + 0.12, _wrap(role, 46), ha="center", va="center", fontsize=7, style="italic")
        listed = ", ".join(m for m in modules[name] if m != name)
        ax.text(
            x,
            y - height / 2 + 0.3,
            _wrap(listed, 52),
            ha="center",
            va="center",
            fontsize=6.5,
            family="monospace",
        )
    xs = [x for x, _ in place.values()]
    ax.set_xlim(min(xs) - width, max(xs) + width)
    ax.set_ylim(-height, top * (height + 1.1) + height)
    ax.axis("off")
    ax.set_title(
        "hpcllm packages: each sits above what it imports (arrow A -> B: A imports B; "
        "errors.py, imported nearly everywhere, without arrows)",
        fontsize=12,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) if text else ""


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "package-map.png"
    draw(target)
    print(f"wrote {target}")
