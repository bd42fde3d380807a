"""`hpcllm generate`: sample text from a run's checkpoint.

One prompt (`--prompt`) is sampled on rank 0. A file of prompts (`--prompts FILE`, one per line)
is task-parallel: under `mpirun -np N` the prompts are spread over the ranks through the shared work
queue (longest first), and the results are written as JSONL in the input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster import runtime
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import TOKENIZER
from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT, GPTShape, sample
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.tasks import dynamic_map, largest_first
from hpcllm.training import checkpoint
from hpcllm.training.config import Config
from hpcllm.training.config import load as load_config


@dataclass
class GenerateArgs:
    run: str
    prompt: str | None = None
    prompts: str | None = None
    output: str | None = None
    checkpoint: str | None = None
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 0


def _check(args: GenerateArgs) -> tuple[Path, list[str]]:
    """Rank 0 validates the input and reads the prompts; every rank gets them or the same error."""
    run = Path(args.run)
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), not {args.temperature}")
    if not (run / "config.yaml").is_file():
        raise UsageError(f"--run {run} is not an hpcllm run directory (config.yaml missing)")
    ckpt = run / "checkpoints" / args.checkpoint if args.checkpoint else checkpoint.latest(run)
    if ckpt is None or not (ckpt / checkpoint.MANIFEST).is_file():
        which = f"checkpoint {args.checkpoint}" if args.checkpoint else "complete checkpoint"
        raise UsageError(f"--run {run} has no {which}; train it first (or name one under checkpoints/)")
    checkpoint.refuse_pickles(ckpt)
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise UsageError(f"--prompts {path} does not exist")
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        if not prompts:
            raise UsageError(f"--prompts {path} is empty")
    else:
        prompts = [args.prompt or ""]
    return ckpt, prompts


def load_model(run: Path, ckpt: Path, rt: runtime.Runtime) -> tuple[GPT, Any, Config]:
    import yaml

    config = load_config(base=yaml.safe_load((run / "config.yaml").read_text()))
    tokenizer = tok.load(run / TOKENIZER)
    m = config.model
    shape = GPTShape(tokenizer.get_vocab_size(), m.block_size, m.n_layer, m.n_head, m.n_embd, 0.0)
    model = GPT(shape).to(rt.device)
    # Every rank holds the whole model here: load the tp=pp=1 shard on a one-rank grid.
    solo = Grid(rt.comm.Split(rt.rank, 0))
    checkpoint.load(ckpt, model, None, solo)
    model.eval()
    return model, tokenizer, config


def generate(args: GenerateArgs) -> int:
    rt = runtime.init(seed=args.seed)
    ckpt, prompts = runtime.root_decides(rt.comm, lambda: _check(args))
    model, tokenizer, _ = runtime.every_rank_checks(rt.comm, lambda: load_model(Path(args.run), ckpt, rt))

    def complete(index: int) -> str:
        # Seeded per prompt: the text does not depend on which rank ran it.
        generator = torch.Generator(device=rt.device).manual_seed(args.seed * 1_000_003 + index)
        ids = tokenizer.encode(prompts[index]).ids or [tok.eot_id(tokenizer)]
        context = torch.tensor([ids], dtype=torch.long, device=rt.device)
        out = sample(model, context, args.max_new_tokens, args.temperature, args.top_k, generator)
        return tokenizer.decode(out[0, len(ids) :].tolist())

    if args.prompts is None:
        if rt.rank == 0:
            print(prompts[0] + complete(0))
        return 0
    mine = list(dynamic_map(rt.comm, largest_first([len(p) for p in prompts]), complete))
    gathered = rt.comm.gather(mine, root=0)
    if rt.rank == 0:
        results = dict(pair for part in gathered for pair in part)
        output = Path(args.output) if args.output else Path(args.run) / "generations.jsonl"
        tmp = output.with_suffix(output.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for index, prompt in enumerate(prompts):
                f.write(json.dumps({"index": index, "prompt": prompt, "completion": results[index]}) + "\n")
        tmp.replace(output)
        print(f"wrote {len(prompts)} completions to {output} ({rt.size} rank(s))")
    return 0
