"""Chat templates: which one a conversation is rendered with, how, and where its replies are.

The template is, in order: `--chat-template FILE`; the tokenizer folder's own (`chat_template.jinja`,
or `chat_template` in `tokenizer_config.json`, as a Hugging Face model ships it); else BUILT_IN. It
is rendered as transformers renders it (a sandboxed Jinja2 environment with trim_blocks and
lstrip_blocks, `raise_exception`, a `tojson` that keeps non-ASCII), with `messages`, `bos_token`,
`eos_token` and `add_generation_prompt`. `strftime_now` is left undefined, so templates that print
today's date fall back to their fixed one and the output does not depend on the day it was made.

Where the assistant's replies are is read from the rendered text itself: reply i spans from the end
of the conversation before it rendered with the generation prompt to the end of the conversation
through it. That needs no generation tags in the template, and covers what the template adds
after a reply (its end-of-turn token), which the model must learn to produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError

ROLES = ("system", "user", "assistant")

# For tokenizers without a template (the BPE hpcllm trains): plain-text headers, and the
# end-of-document token closing every reply, so that generation stops there.
BUILT_IN = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

# Tokens that end a turn in the templates of common model families (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class TemplateMismatch(ValueError):
    """The template renders a conversation's prefix as something the whole does not start with."""


def template_of(folder: Path | None, template_file: str | None) -> tuple[str, str]:
    """(template text, where it came from); `folder` holds the tokenizer (None: one hpcllm made)."""
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise UsageError(f"--chat-template {template_file} does not exist; give a Jinja2 template file")
        return path.read_text(), str(path.resolve())
    if folder is None:
        return BUILT_IN, "built-in"
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(), str((folder / "chat_template.jinja").resolve())
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        return template, str((folder / "tokenizer_config.json").resolve())
    return BUILT_IN, "built-in"


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    bos_token: str
    eos_token: str

    @cached_property
    def compiled(self) -> Any:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, **kwargs: Any) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise UsageError(f"the chat template does not parse (line {exc.lineno}: {exc.message})") from exc

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.compiled.render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def reply_spans(self, messages: list[dict[str, str]], which: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant replies: all of them
        (`which` = assistant) or the last message's (last). TemplateMismatch when the template does
        not render prefixes as prefixes."""
        whole = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or (which == "last" and i != len(messages) - 1):
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and whole.startswith(through)):
                raise TemplateMismatch(f"message {i}")
            spans.append((len(before), len(through)))
        return whole, spans


def chat_template(folder: Path | None, template_file: str | None, bos: str | None, eos: str) -> ChatTemplate:
    """The template to render conversations with, checked to parse; `bos` and `eos` are the
    tokenizer's document tokens (a tokenizer_config.json's own take precedence)."""
    text, _ = template_of(folder, template_file)
    config = {} if folder is None else _tokenizer_config(folder)
    template = ChatTemplate(
        text,
        _token_text(config.get("bos_token")) or bos or "",
        _token_text(config.get("eos_token")) or eos,
    )
    _ = template.compiled
    return template


def encode_chat_prompts(
    tokenizer: Any, template: ChatTemplate, prompts: list[str], system: str | None = None
) -> list[list[int]]:
    """Each prompt as a user's message (after a system message, if given), rendered with the
    generation prompt: the ids a fine-tuned model continues with its reply."""
    head = [{"role": "system", "content": system}] if system else []
    conversations = [[*head, {"role": "user", "content": prompt}] for prompt in prompts]
    try:
        texts = [template.render(messages, add_generation_prompt=True) for messages in conversations]
    except Exception as exc:  # noqa: BLE001 - the template's own error (raise_exception, undefined, sandbox)
        raise UsageError(
            f"the chat template cannot render a prompt ({exc}); check --system and the template"
        ) from exc
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]


def stop_ids(tokenizer: Any, eos: int) -> frozenset[int]:
    """Where a reply ends: the end-of-document token and any end-of-turn token the tokenizer has."""
    found = (tokenizer.token_to_id(token) for token in END_OF_TURN)
    return frozenset([eos, *(i for i in found if i is not None)])
