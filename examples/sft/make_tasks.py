"""Write the fine-tuning example's data (docs/training.md, "Fine-tuning"): a small instruction set
of two tasks a model pretrained on Python code gets wrong, and multiple-choice files to score them.

    addition  "What is 3 plus 4?" -> "7", single digits: 100 facts to learn
    parity    "Is 734 even? Answer yes or no." -> "yes": numbers 0..999, half of them held out of the
              training set, so that its score measures a rule learnt rather than answers remembered

train.jsonl holds chat records ({"messages": [...]}) for `hpcllm prepare --format sft`;
addition.jsonl and parity.jsonl hold choices ({"context", "endings", "label"}) for `hpcllm eval`,
their contexts rendered with hpcllm's built-in chat template, as `hpcllm generate --chat` renders a
prompt. Deterministic: run it again and the files are the same.

    python examples/sft/make_tasks.py [--out examples/sft]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from hpcllm.data.chat import BUILT_IN, ChatTemplate

EOS = "<|endoftext|>"  # the end-of-document token of hpcllm's BPE: the built-in template ends replies with it


def addition(a: int, b: int) -> tuple[str, str]:
    return f"What is {a} plus {b}?", str(a + b)


def parity(n: int) -> tuple[str, str]:
    return f"Is {n} even? Answer yes or no.", "yes" if n % 2 == 0 else "no"


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent))
    out = Path(parser.parse_args().out)
    rng = random.Random(0)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    seen, held_out = numbers[:500], numbers[500:]
    records = [chat(*addition(a, b)) for a in range(10) for b in range(10) for _ in range(12)]
    records += [chat(*parity(n)) for n in seen for _ in range(3)]
    rng.shuffle(records)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    template = ChatTemplate(BUILT_IN, "", EOS)

    def context(question: str) -> str:
        return template.render([{"role": "user", "content": question}], add_generation_prompt=True)

    lines = []
    for a in range(10):
        for b in range(10):
            question, answer = addition(a, b)
            wrong = [str(a + b + 1), str(a + b - 1 if a + b else a + b + 2)]
            endings = [answer, *wrong]
            rng.shuffle(endings)
            lines.append(
                {
                    "context": context(question),
                    "endings": [e + EOS for e in endings],
                    "label": endings.index(answer),
                }
            )
    (out / "addition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    lines = []
    for n in sorted(held_out)[::2]:  # 250 numbers the training set never asks about
        question, answer = parity(n)
        endings = ["yes" + EOS, "no" + EOS]
        lines.append({"context": context(question), "endings": endings, "label": endings.index(answer + EOS)})
    (out / "parity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"wrote {len(records)} training records and {100 + len(lines)} choices to {out}")


if __name__ == "__main__":
    main()
