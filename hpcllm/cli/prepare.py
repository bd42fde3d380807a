"""`hpcllm prepare`: tokenize a corpus into token files, task-parallel over the ranks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpcllm.data.corpus import DEFAULT_EXTENSIONS


def add_parser(commands: Any) -> None:
    prep = commands.add_parser(
        "prepare",
        help="tokenize a corpus into token files, in parallel over ranks",
        description="Tokenize text files, directories and JSONL files (plain, .gz or .zst) into train/val "
        "token files plus a manifest. With no SOURCES, the Python standard library's .py files. Under "
        "mpirun the files, and ranges of large JSONL files, are spread over the ranks; the output is the "
        "same for any number of ranks.",
    )
    prep.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="text file, directory, or .jsonl / .jsonl.gz / .jsonl.zst file",
    )
    prep.add_argument("--out", required=True, help="output directory (created; must be empty unless --force)")
    prep.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe: a byte-level BPE trained on the corpus (default); byte: bytes; or a tokenizer.json "
        "or a folder holding one (an exported Hugging Face model) to reuse",
    )
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument(
        "--val-ratio", type=float, default=0.05, help="share of documents for validation (0.05)"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    prep.add_argument(
        "--field",
        "--text-field",
        dest="text_field",
        default="text",
        help="JSONL text field (text)",
    )
    prep.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="extensions read from directories")
    prep.add_argument(
        "--dtype", default="auto", help="token dtype: auto (uint16 if the vocabulary fits), uint16, uint32"
    )
    prep.add_argument(
        "--bpe-sample-mb",
        type=float,
        default=0,
        help="MiB of text the BPE is trained on, the first documents of every piece of the corpus "
        "(default: 256 bytes per vocabulary entry, 1 MiB for 4096)",
    )
    prep.add_argument(
        "--chunk-mb",
        type=float,
        default=32,
        help="an uncompressed JSONL file larger than this is cut into ranges of it, spread over ranks (32)",
    )
    prep.add_argument(
        "--force", action="store_true", help="replace a non-empty --out (only once the new data is complete)"
    )
    prep.add_argument(
        "--json", action="store_true", help="print the summary as JSON (seconds, tokens, phases, memory)"
    )
    _add_sft_arguments(prep)
    prep.set_defaults(func=run)


def _add_sft_arguments(prep: Any) -> None:
    from hpcllm.data import sft

    group = prep.add_argument_group(
        "fine-tuning data (--format sft)",
        'JSONL records {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]} '
        "into samples with loss masks; --tokenizer names the base model's tokenizer (docs/training.md)",
    )
    group.add_argument(
        "--format", default="text", choices=("text", "sft"), help="text: pretraining documents (default)"
    )
    group.add_argument(
        "--train-on",
        default="assistant",
        choices=sft.TRAIN_ON,
        help="tokens the loss counts: assistant (completions and every reply; default), last, all",
    )
    group.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja2 chat template (default: the tokenizer folder's own, else a built-in one)",
    )
    group.add_argument(
        "--too-long",
        default="truncate",
        choices=sft.TOO_LONG,
        help="a sample over --max-tokens is cut to it (truncate; default) or left out (drop)",
    )
    group.add_argument(
        "--max-tokens", type=int, default=sft.DEFAULT_MAX_TOKENS, help="tokens per sample at most (2048)"
    )
    defaults = sft.SftFields()
    for name in ("prompt", "completion", "messages"):
        group.add_argument(
            f"--{name}-field", default=getattr(defaults, name), help=f"the records' {name} field ({name})"
        )


def run(args: argparse.Namespace) -> int:
    from hpcllm.cluster import runtime
    from hpcllm.data import prepare
    from hpcllm.data.sft import SftFields

    options = prepare.PrepareOptions(
        sources=args.sources,
        out=Path(args.out),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_ratio=args.val_ratio,
        seed=args.seed,
        text_field=args.text_field,
        extensions=tuple(e.strip() for e in args.ext.split(",") if e.strip()),
        dtype=args.dtype,
        force=args.force,
        bpe_sample_bytes=int(args.bpe_sample_mb * (1 << 20)),
        chunk_bytes=int(args.chunk_mb * (1 << 20)),
        format=args.format,
        train_on=args.train_on,
        chat_template=args.chat_template,
        too_long=args.too_long,
        max_tokens=args.max_tokens,
        fields=SftFields(args.prompt_field, args.completion_field, args.messages_field),
    )
    prepare.check_options(options)
    rt = runtime.init(seed=args.seed, model=False)
    prepare.set_tokenizer_threads(rt.threads)
    summary = prepare.prepare(options, rt.comm)
    if rt.rank == 0 and args.json:
        print(json.dumps(summary.to_dict()))
    elif rt.rank == 0:
        wrote = f"wrote {options.out}/ ({', '.join(sorted(p.name for p in options.out.iterdir()))})"
        print("\n".join([*summary.lines(), wrote]))
    return 0
