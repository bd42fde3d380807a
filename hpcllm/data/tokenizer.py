"""Tokenizers through the HF `tokenizers` library: a byte-level BPE trained on the corpus, or plain bytes.

Both are saved as `tokenizer.json` and loaded the same way. Every document ends with the
end-of-text token, so documents never run into each other in the token stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


def eot_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    return token_id


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
