"""Tokenizers through the HF `tokenizers` library: a byte-level BPE trained on the corpus, or plain bytes.

Both are saved as `tokenizer.json` and loaded the same way, as is a Hugging Face folder's. Every
document ends with the end-of-document token (and starts with the beginning-of-document token of
tokenizers that have one, Llama's), so documents never run into each other in the token stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
KINDS = ("bpe", "byte")
DEFAULT_VOCAB_SIZE = 4096  # enough for the tiny preset; small embedding, fast softmax


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


PARALLELISM = "TOKENIZERS_PARALLELISM"  # the library reads it at every call


@contextmanager
def parallelism(on: bool) -> Iterator[None]:
    """Whether the tokenizers library spreads the calls inside over its thread pool; restored after."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true" if on else "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = before


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is representable, merges learned from `texts`."""
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def byte_tokenizer() -> Tokenizer:
    """256 byte symbols (ids 0-255 in byte order) and the end-of-text token (id 256)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _BYTE_OF[ch])
    vocab = {symbol: byte for byte, symbol in enumerate(alphabet)}
    vocab[EOT] = 256
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_BYTE_OF = {ch: byte for byte, ch in _bytes_to_unicode().items()}


def given_file(text: str) -> Path | None:
    """A tokenizer named by path: a tokenizer.json, or a folder holding one (an exported Hugging Face
    model); None when `text` is a kind (bpe, byte)."""
    if text in KINDS:
        return None
    path = Path(text)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--tokenizer takes {', '.join(KINDS)}, a tokenizer.json or a folder holding one")
    return path


# The (beginning, end) of document tokens of the tokenizer families hpcllm knows, tried in order:
# GPT-2's (also Qwen2's and SmolLM's) end-of-text alone, Llama 3's, then Llama 2's and Mistral's.
BOUNDARIES = ((None, EOT), ("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"))


@dataclass(frozen=True)
class DocumentTokens:
    """The ids around every document: `bos` before it (None when the tokenizer has no such token) and
    `eos` after it, so documents never run into each other in the token stream."""

    bos: int | None
    eos: int

    def wrap(self, ids: list[int]) -> list[int]:
        return ([] if self.bos is None else [self.bos]) + ids + [self.eos]


def document_tokens(tokenizer: Tokenizer) -> DocumentTokens:
    """The first pair of BOUNDARIES the tokenizer has both tokens of."""
    for begin, end in BOUNDARIES:
        eos = tokenizer.token_to_id(end)
        bos = None if begin is None else tokenizer.token_to_id(begin)
        if eos is not None and (begin is None or bos is not None):
            return DocumentTokens(bos, eos)
    ends = ", ".join(end for _, end in BOUNDARIES)
    raise ValueError(f"the tokenizer has no end-of-document token (one of {ends})")


def eot_id(tokenizer: Tokenizer) -> int:
    """The end-of-document token's id."""
    return document_tokens(tokenizer).eos


def encode_prompts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompts' ids as a document starts in the training data: after the beginning-of-document
    token when the tokenizer has one (the tokenizer's own post-processor is not used, so no token
    comes twice); an empty prompt without one is the end-of-document token (the model needs a
    position to start from)."""
    boundaries = document_tokens(tokenizer)
    start = [] if boundaries.bos is None else [boundaries.bos]
    encoded = [start + tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    return [ids or [boundaries.eos] for ids in encoded]


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def vocabulary(source: Tokenizer | str | Path) -> dict[str, int]:
    """Token ids by string (a tokenizer, or the tokenizer.json at a path): two tokenizers that agree
    on it give every id the same meaning."""
    tokenizer = source if isinstance(source, Tokenizer) else load(source)
    return tokenizer.get_vocab(with_added_tokens=True)
