"""Fine-tuning records into samples: token ids and a loss mask (`hpcllm prepare --format sft`).

A record is a prompt and its completion, `{"prompt": ..., "completion": ...}`, or a conversation,
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (other field names
with --prompt-field, --completion-field, --messages-field). A prompt/completion sample is the
tokenizer's beginning-of-document token (if it has one), prompt and completion tokenized as one
text, and the end-of-document token; a conversation is its rendering by the chat template
(hpcllm.data.chat), tokenized whole.

Which tokens train (`--train-on`): `assistant` (the default) the completion and every assistant
reply, `last` the completion or the last message (which must be the assistant's), `all` every
token. A token trains when its characters overlap a trained span, so a token that merges the
template's text with the reply's first characters is trained: the model must produce it. The first
token of a sample never is (nothing before it predicts it).

A record that cannot become a sample is counted by kind (BAD_KINDS) and left out; one longer than
`--max-tokens` is cut to it (`--too-long truncate`, counted as truncated) or left out (`drop`,
counted as too_long).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcllm.data.chat import ROLES, ChatTemplate, TemplateMismatch
from hpcllm.data.tokenizer import DocumentTokens

TRAIN_ON = ("assistant", "all", "last")
TOO_LONG = ("truncate", "drop")
DEFAULT_MAX_TOKENS = 2048
# What a record can be that gives no sample (besides not JSON or not UTF-8, corpus.BAD_KINDS).
BAD_KINDS = (
    "missing_field",
    "bad_messages",
    "last_not_assistant",
    "template_error",
    "template_mismatch",
    "no_trained_token",
    "too_long",
)


@dataclass(frozen=True)
class SftFields:
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class Sample:
    ids: np.ndarray  # int64
    mask: np.ndarray  # uint8, 1 where the token is a trained target
    truncated: bool


@dataclass
class SftEncoder:
    tokenizer: Any
    template: ChatTemplate
    boundaries: DocumentTokens
    train_on: str = "assistant"
    too_long: str = "truncate"
    max_tokens: int = DEFAULT_MAX_TOKENS
    fields: SftFields = SftFields()

    def encode(self, record: Any) -> Sample | str:
        """The record's sample, or the kind of what is wrong with it (one of BAD_KINDS)."""
        if not isinstance(record, dict):
            return "missing_field"
        f = self.fields
        if isinstance(record.get(f.prompt), str) and isinstance(record.get(f.completion), str):
            found = self._prompt_completion(record[f.prompt], record[f.completion])
        elif f.messages in record:
            found = self._conversation(record[f.messages])
        else:
            return "missing_field"
        return found if isinstance(found, str) else self._limited(*found)

    def _prompt_completion(self, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
        text = prompt + completion
        ids, mask = self._tokens(text, [(0 if self.train_on == "all" else len(prompt), len(text))])
        bos = [] if self.boundaries.bos is None else [self.boundaries.bos]
        ids = np.concatenate([bos, ids, [self.boundaries.eos]]).astype(np.int64)
        mask = np.concatenate([[0] * len(bos), mask, [1]]).astype(np.uint8)
        return ids, mask

    def _conversation(self, messages: Any) -> tuple[np.ndarray, np.ndarray] | str:
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            return "bad_messages"
        if self.train_on == "last" and messages[-1]["role"] != "assistant":
            return "last_not_assistant"
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text, spans = self.template.reply_spans(messages, self.train_on)
        except TemplateMismatch:
            return "template_mismatch"
        except Exception:  # noqa: BLE001 - a template's own error (raise_exception, undefined, sandbox)
            return "template_error"
        return self._tokens(text, [(0, len(text))] if self.train_on == "all" else spans)

    def _tokens(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """The text's ids and whether each token's characters overlap a trained span."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        return ids, trained.astype(np.uint8)

    def _limited(self, ids: np.ndarray, mask: np.ndarray) -> Sample | str:
        mask = mask.copy()
        mask[:1] = 0  # the first token is never a target
        truncated = len(ids) > self.max_tokens
        if truncated and self.too_long == "drop":
            return "too_long"
        ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
        if not mask.any():
            return "no_trained_token"
        return Sample(ids, mask, truncated)
