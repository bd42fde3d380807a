"""`hpcllm generate`: sample text from a run's checkpoint.

Generation runs through hpcllm.model.inference: a KV cache, and prompts in batches of
`--batch-size` (left-padded; a prompt gets the same text in any batch, each sampled from its own
seeded generator). `--tp N` splits the model over N ranks (each holds its part of the weights
and of the cache). One prompt (`--prompt`) is sampled by the first replica, printed by rank 0. A
file of prompts (`--prompts FILE`, one per line) is task-parallel over the world / tp replicas:
batches of similar length go through the shared work queue (longest first), and the results are
written as JSONL in the input order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster import runtime
from hpcllm.data import chat
from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import TOKENIZER
from hpcllm.errors import UsageError
from hpcllm.model import inference
from hpcllm.model.gpt import GPT
from hpcllm.model.partition import partition_tensor_parallel
from hpcllm.model.registry import family_of, family_of_shape
from hpcllm.observe.memory import tensor_bytes
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.tasks import dynamic_map, largest_first
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.training import checkpoint
from hpcllm.training.checkpoint import run_checkpoint
from hpcllm.training.config import Config
from hpcllm.training.config import load as load_config

log = logging.getLogger("hpcllm.generate")


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
    tp: int = 1
    batch_size: int = 8
    no_cache: bool = False
    chat: bool = False  # prompts are a user's messages; the reply is what is printed
    system: str | None = None  # with chat: a system message before each prompt


def _check(args: GenerateArgs, world: int) -> tuple[Path, list[str]]:
    """Rank 0 validates the input and reads the prompts; every rank gets them or the same error."""
    run = Path(args.run)
    if args.tp < 1 or world % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the {world} rank(s); run with a multiple of it")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), not {args.temperature}")
    ckpt = run_checkpoint(run, args.checkpoint)
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


def load_model(
    run: Path, ckpt: Path, rt: runtime.Runtime, grid: Grid | None = None
) -> tuple[GPT, Any, Config, TensorCollectives | None]:
    """The run's model from `ckpt` (of any layout), whole on every rank; with a `grid` of tp > 1,
    this rank's tensor-parallel part of it and the TP group."""
    import yaml

    config = load_config(base=yaml.safe_load((run / "config.yaml").read_text()))
    tokenizer = tok.load(run / TOKENIZER)

    def weights(model: GPT, layout: Grid) -> None:
        checkpoint.load(ckpt, model, None, layout)  # resharded to this TP rank's part

    model, group = build_for_inference(config, tokenizer.get_vocab_size(), rt, grid, weights)
    return model, tokenizer, config, group


def build_for_inference(
    config: Config, vocab_size: int, rt: runtime.Runtime, grid: Grid | None, weights: Any
) -> tuple[GPT, TensorCollectives | None]:
    """The config's model in eval mode, whole on every rank, or this rank's tensor-parallel part
    with a `grid` of tp > 1 (and the TP group); `weights(model, grid)` loads its tensors."""
    family = family_of(config.model)
    shape = family.shape(replace(config.model, dropout=0.0), vocab_size)
    model = family.build(shape, None, None, True, True).to(rt.device)
    group = None
    if grid is not None and grid.layout.tp > 1:
        family.check(config.model, grid.layout.tp)
        group = TensorCollectives(grid.tp_comm, "mpi4py")
        partition_tensor_parallel(model, group)
        weights(model, grid)
    else:  # every rank holds the whole model: the tp=pp=1 shard on a one-rank grid
        weights(model, Grid(rt.comm.Split(rt.rank, 0)))
    model.eval()
    return model, group


def _encode(args: GenerateArgs, tokenizer: Any, prompts: list[str]) -> tuple[list[list[int]], frozenset[int]]:
    """The prompts' ids, and the tokens that end a completion: with --chat, each prompt is a user's
    message rendered by the run's chat template (its fine-tuning data's, else the built-in one)
    and the reply ends at an end of turn or of document; else plain text, to the length asked."""
    if not args.chat:
        return tok.encode_prompts(tokenizer, prompts), frozenset()
    boundaries = tok.document_tokens(tokenizer)
    bos = None if boundaries.bos is None else tokenizer.id_to_token(boundaries.bos)
    template = chat.chat_template(Path(args.run), None, bos, tokenizer.id_to_token(boundaries.eos))
    return chat.encode_chat_prompts(tokenizer, template, prompts, args.system), chat.stop_ids(
        tokenizer, boundaries.eos
    )


def _batches(lengths: list[int], size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (less padding), longest batch first."""
    order = largest_first(lengths)
    return [order[i : i + size] for i in range(0, len(order), size)]


def generate(args: GenerateArgs) -> int:
    rt = runtime.init(seed=args.seed)
    ckpt, prompts = runtime.root_decides(rt.comm, lambda: _check(args, rt.size))
    grid = Grid(rt.comm, tp=args.tp)
    model, tokenizer, _, group = runtime.every_rank_checks(
        rt.comm, lambda: load_model(Path(args.run), ckpt, rt, grid)
    )
    if args.tp > 1:  # a log line: standard output carries the generated text only
        mine, whole = (
            tensor_bytes(list(model.parameters())),
            family_of_shape(model.shape).parameters(model.shape).total * 4,
        )
        log.info(
            "tp %d: %.2f MB of weights on each rank, of %.2f MB in all", args.tp, mine / 1e6, whole / 1e6
        )
    encoded, stop = _encode(args, tokenizer, prompts)

    def complete(batch: list[int]) -> list[tuple[int, str]]:
        # Seeded per prompt: the text does not depend on which rank or batch ran it.
        generators = [torch.Generator(device=rt.device).manual_seed(args.seed * 1_000_003 + i) for i in batch]
        new = inference.generate(
            model,
            [encoded[i] for i in batch],
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            generators,
            use_cache=not args.no_cache,
            tp_group=group,
            stop=stop,
        )
        return [(i, tokenizer.decode(tokens)) for i, tokens in zip(batch, new, strict=True)]

    if args.prompts is None:
        if grid.coords.dp == 0:  # the first replica (its TP ranks together)
            text = complete([0])[0][1]
            if rt.rank == 0:
                print(text if args.chat else prompts[0] + text)
        return 0
    batches = _batches([len(ids) for ids in encoded], args.batch_size)
    done = dynamic_map(rt.comm, list(range(len(batches))), lambda b: complete(batches[b]), team=grid.tp_comm)
    gathered = rt.comm.gather([pair for _, pairs in done for pair in pairs], root=0)
    if rt.rank == 0:
        results = dict(pair for part in gathered for pair in part)
        output = Path(args.output) if args.output else Path(args.run) / "generations.jsonl"
        tmp = output.with_suffix(output.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for index, prompt in enumerate(prompts):
                f.write(json.dumps({"index": index, "prompt": prompt, "completion": results[index]}) + "\n")
        tmp.replace(output)
        replicas = rt.size // args.tp
        print(f"wrote {len(prompts)} completions to {output} ({replicas} replica(s) of tp {args.tp})")
    return 0
