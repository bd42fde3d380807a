"""`hpcllm eval`: a run's checkpoint (any layout it was saved from) or a Hugging Face folder, scored
on prepared data (loss per trained token, perplexity) and on multiple-choice tasks (accuracy).

The work is task-parallel: the world splits into replicas of `--tp` ranks (a replica holds the
model, or its tensor-parallel parts), and the replicas take batches from a shared work queue
(hpcllm.parallel.tasks). Batches are fixed by the input alone and added up in their order on rank
0, so the numbers do not depend on the number of ranks. Rank 0 shows the progress of all ranks,
prints the result (one JSON object with --json) and writes it to --out (for a run, by default
RUN/eval-CHECKPOINT.json).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcllm.batch import Batch
from hpcllm.cluster import runtime
from hpcllm.data import choices as mc
from hpcllm.data import tokenizer as tok
from hpcllm.data.mixture import Mixture
from hpcllm.data.tokens import SPLITS, Prepared, open_prepared
from hpcllm.errors import UsageError
from hpcllm.model import hf_folder
from hpcllm.model.registry import family_of_hf_folder
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.tasks import SharedCounters, dynamic_map
from hpcllm.training import checkpoint, generate, init_from
from hpcllm.training.config import load as load_config


@dataclass
class EvalArgs:
    run: str | None = None
    step: int | None = None
    hf: str | None = None
    data: str | None = None
    split: str = "val"
    choices: str | None = None
    json: bool = False
    out: str | None = None
    tp: int = 1
    batch_size: int = 8
    limit: int = 0  # of --data's sequences, 0 = all


@dataclass
class Inputs:
    """What rank 0 checked and read, for every rank."""

    source: Any  # the run's checkpoint (Path) or the Hugging Face folder
    examples: list[mc.Example] | None
    out: Path | None
    data: Prepared | None


def _check(args: EvalArgs, world: int) -> Inputs:
    if (args.run is None) == (args.hf is None):
        raise UsageError("give exactly one of --run DIR or --hf DIR")
    if args.data is None and args.choices is None:
        raise UsageError(
            "nothing to evaluate: give --data DIR (prepared data), --choices FILE.jsonl, or both"
        )
    if args.tp < 1 or world % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the {world} rank(s); run with a multiple of it")
    if args.batch_size < 1 or args.limit < 0:
        raise UsageError("--batch-size must be at least 1 and --limit not negative")
    if args.split not in SPLITS:
        raise UsageError(f"--split takes {' or '.join(SPLITS)}, not {args.split}")
    data = open_prepared(args.data, verify=False) if args.data is not None else None
    examples = mc.read_examples(args.choices) if args.choices else None
    out = Path(args.out) if args.out else None
    if args.run is not None:
        name = None if args.step is None else checkpoint.step_name(args.step)
        ckpt = checkpoint.run_checkpoint(Path(args.run), name)
        return Inputs(ckpt, examples, out or Path(args.run) / f"eval-{ckpt.name}.json", data)
    path = Path(args.hf)
    return Inputs(family_of_hf_folder(path).hf().read_config(path), examples, out, data)


def _load(args: EvalArgs, inputs: Inputs, rt: runtime.Runtime, grid: Grid) -> tuple[Any, Any, int, Any]:
    """(model, tokenizer, block_size, TP group) of the run's checkpoint or the folder."""
    if args.run is not None:
        model, tokenizer, config, group = generate.load_model(Path(args.run), inputs.source, rt, grid)
        return model, tokenizer, config.model.block_size, group
    folder = inputs.source
    config = load_config(assignments=folder.model_settings())
    tokenizer = tok.load(folder.path / hf_folder.TOKENIZER_FILE)

    def weights(model: Any, layout: Grid) -> None:
        init_from.load_weights(model, folder, layout)

    model, group = generate.build_for_inference(config, folder.vocab_size, rt, grid, weights)
    return model, tokenizer, config.model.block_size, group


def _same_tokenizer(data: Prepared, tokenizer: Any) -> None:
    if tok.vocabulary(data.tokenizer_path) != tok.vocabulary(tokenizer):
        raise UsageError(
            f"the data in {data.path} was prepared with another tokenizer than the model's; prepare it "
            "with `hpcllm prepare CORPUS --tokenizer RUN_OR_FOLDER --out DIR`"
        )


def evaluate(args: EvalArgs) -> int:
    start = time.perf_counter()
    rt = runtime.init(seed=0)
    inputs = runtime.root_decides(rt.comm, lambda: _check(args, rt.size))
    grid = Grid(rt.comm, tp=args.tp)
    model, tokenizer, block, group = runtime.every_rank_checks(rt.comm, lambda: _load(args, inputs, rt, grid))
    results: dict[str, Any] = {}
    data = inputs.data
    if data is not None:
        runtime.root_decides(rt.comm, lambda: _same_tokenizer(data, tokenizer))
        results.update(_perplexity(args, data, model, block, rt, grid))
    if inputs.examples is not None:
        batches = mc.batches_of(mc.example_rows(tokenizer, inputs.examples, block), args.batch_size)
        sums = _over_batches(len(batches), batches.__getitem__, model, rt, grid, "choices", per_row=True)
        if rt.rank == 0:
            results.update(mc.score(inputs.examples, [x for part in sums for x in part]))
    results.update(ranks=rt.size, tp=args.tp, seconds=round(time.perf_counter() - start, 3))
    results["model"] = str(inputs.source if args.run else inputs.source.path)
    if rt.rank == 0:
        _report(args, inputs, results)
    return 0


def _perplexity(
    args: EvalArgs, data: Prepared, model: Any, block: int, rt: Any, grid: Grid
) -> dict[str, Any]:
    """Loss per trained token of the split's sequences in order (fine-tuning samples packed: the
    same per-token losses as alone, hpcllm.data.packing)."""
    reader = Mixture([data], [1.0]).reader(data, args.split, block)
    count = reader.n_sequences if not args.limit else min(args.limit, reader.n_sequences)
    size = args.batch_size

    def batch(index: int) -> Batch:  # read by the replica that takes it, when it takes it
        return reader.rows(np.arange(index * size, min((index + 1) * size, count)))

    sums = _over_batches(-(-count // size), batch, model, rt, grid, f"{args.split} loss", per_row=False)
    if rt.rank != 0:
        return {}
    total = math.fsum(s for s, _ in sums)
    tokens = sum(n for _, n in sums)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "sequences": count}


def _over_batches(
    count: int, batch_at: Callable[[int], Batch], model: Any, rt: Any, grid: Grid, label: str, per_row: bool
) -> list[Any]:
    """The loss sums of batches 0..count-1 (`batch_at(i)`; per row, or the sum and trained-target
    count), by the replicas over the work queue; in batch order on rank 0 (empty elsewhere)."""

    @torch.no_grad()
    def work(index: int) -> Any:
        host = batch_at(index)
        batch = host.to_device(rt.device)
        logits = model(batch.tokens, batch.positions, mask=batch.attention)
        if per_row:
            return model.row_loss_sums(logits, batch.targets).tolist()
        return model.loss_sum(logits, batch.targets).item(), host.trained_tokens()

    done = SharedCounters(rt.comm)
    bar = _bar(count, label) if rt.rank == 0 and count > 1 else None

    def on_done(_: int, __: Any) -> None:
        finished = done.fetch_add() + 1 if grid.tp_rank == 0 else 0
        if bar is not None:
            bar.n = finished
            bar.refresh()

    mine = list(dynamic_map(rt.comm, list(range(count)), work, on_done, grid.tp_comm))
    gathered = rt.comm.gather(mine if grid.tp_rank == 0 else [], root=0)
    done.free()
    if bar is not None:
        bar.n = count
        bar.close()
    if rt.rank != 0:
        return []
    found = dict(pair for part in gathered for pair in part)
    return [found[i] for i in range(count)]


def _bar(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {label}", unit="batch", mininterval=0.5, disable=None)


def _report(args: EvalArgs, inputs: Inputs, results: dict[str, Any]) -> None:
    if inputs.out is not None:
        inputs.out.parent.mkdir(parents=True, exist_ok=True)
        partial = inputs.out.with_name(f".{inputs.out.name}.partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(inputs.out)
    if args.json:
        print(json.dumps({key: value for key, value in results.items() if key != "per_example"}))
        return
    lines = []
    if "loss" in results:
        lines.append(
            f"{args.split}: loss {results['loss']:.4f} per token, perplexity {results['perplexity']:.2f} "
            f"({results['tokens']:,} tokens in {results['sequences']:,} sequences)"
        )
    if "accuracy" in results:
        lines.append(
            f"choices: accuracy {results['accuracy']:.3f}, length-normalised {results['accuracy_norm']:.3f} "
            f"({results['examples']:,} examples)"
        )
    where = f"; wrote {inputs.out}" if inputs.out is not None else ""
    lines.append(f"{results['ranks']} rank(s), tp {results['tp']}, {results['seconds']:.1f} s{where}")
    print("\n".join(lines))
