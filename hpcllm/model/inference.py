"""Generation that serves: prompts in batches, a KV cache, and tensor-parallel models, through the
same modules as training (attention takes the cache; `model.kv_cache`).

Prompts of a batch are left-padded to one length; every row keeps its own positions (counted over
its real tokens) and never attends to padding, so a row gets the tokens it would get alone. The
cache holds each layer's keys and values, so a new token costs one position's forward instead of
the whole context's. Positions are learned up to block_size: once a row would pass it, the
context slides (the last block_size tokens are kept), and the window is recomputed each token
(no cache can help when every position shifts). On a tensor-parallel model each rank runs its
own heads and MLP columns and caches its heads only; the row-parallel layers sum over the TP group
as in training, and the vocabulary slices of the logits are gathered before a token is chosen, so
every TP rank picks the same one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcllm.model.gpt import GPT
from hpcllm.model.kv_cache import KVCache
from hpcllm.parallel.tensor.collectives import TensorCollectives


def _attention_mask(valid: torch.Tensor, new: int) -> torch.Tensor | None:
    """[batch, 1, new, time]: the last `new` positions attend causally to real tokens. A padding
    position attends to itself only, so no row of the softmax is empty (an empty one gives NaN).
    None when nothing is padded and the new positions are one or all: attention is then plain
    causal (the fast kernels)."""
    time = valid.shape[1]
    if (new == 1 or new == time) and bool(valid.all()):
        return None
    query = torch.arange(time - new, time, device=valid.device)[:, None]
    key = torch.arange(time, device=valid.device)[None, :]
    allowed = (key <= query) & valid[:, None, :]
    allowed |= key == query
    return allowed[:, None, :, :]


def next_logits(
    model: GPT,
    ids: torch.Tensor,
    valid: torch.Tensor,
    cache: KVCache | None,
    tp_group: TensorCollectives | None = None,
) -> torch.Tensor:
    """Logits [batch, vocab] after the last position. `ids` are the positions not yet in `cache`
    (all of them without one); `valid` marks the real tokens of the whole context so far."""
    new = ids.shape[1]
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, -new:]
    hidden = model.forward_stage(ids, True, False, positions, cache, _attention_mask(valid, new))
    logits = model.head(hidden[:, -1:, :])[:, -1, :]
    if tp_group is not None and tp_group.size > 1:  # this rank's vocabulary slice -> all of it
        logits = tp_group.allgather(logits, dim=-1)
    return logits[:, : model.shape.vocab_size]


def choose(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row [batch, 1]: greedy at temperature 0, else sampled among the top k."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generators: list[torch.Generator] | None = None,
    use_cache: bool = True,
    tp_group: TensorCollectives | None = None,
    stop: frozenset[int] = frozenset(),
) -> list[list[int]]:
    """The new tokens of each prompt (a batch, left-padded here). `generators`: one per prompt,
    so a row's samples do not depend on the batch it ran in. A row ends before the first token in
    `stop` (an end of turn or of document); the batch ends when every row has."""
    device = model.wte.weight.device
    block = model.shape.block_size
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt) :] = True
    # Rows longer than block_size start from their last block_size tokens.
    ids, valid = ids[:, -block:], valid[:, -block:]
    cache = KVCache(block) if use_cache else None
    pending = ids  # positions the model has not seen yet
    out: list[torch.Tensor] = []
    stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = next_logits(model, ids if cache is None else pending, valid, cache, tp_group)
        if generators is None:
            token = choose(logits, temperature, top_k, None)
        else:
            token = torch.cat(
                [choose(logits[r : r + 1], temperature, top_k, g) for r, g in enumerate(generators)]
            )
        out.append(token)
        if stop:  # one host read per token, only when there is something to stop at
            stopped |= torch.isin(token[:, 0], stop_ids)
            if bool(stopped.all()):
                break
        ids = torch.cat([ids, token], dim=1)
        valid = torch.cat([valid, torch.ones_like(token, dtype=torch.bool)], dim=1)
        pending = token
        if int(valid.sum(dim=1).max()) > block:  # the window slides: every position shifts
            ids, valid = ids[:, -block:], valid[:, -block:]
            cache = KVCache(block) if use_cache else None
            pending = ids
    rows = torch.cat(out, dim=1).tolist()
    return [_before_stop(row, stop) for row in rows] if stop else rows


def _before_stop(row: list[int], stop: frozenset[int]) -> list[int]:
    return next((row[:i] for i, token in enumerate(row) if token in stop), row)
