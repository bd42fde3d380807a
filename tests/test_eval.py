"""`hpcllm eval`: multiple-choice log-likelihoods and data loss equal transformers' on the same
folder, the same numbers at any rank count and tp, and bad input in one line."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_usage_error, run_hpcllm
from test_llama_hf import OPTIONS, make_folder

from hpcllm.batch import IGNORE
from hpcllm.data import tokenizer as tok
from hpcllm.data.choices import example_rows, read_examples
from hpcllm.data.sequences import TokenWindows
from hpcllm.data.tokens import open_prepared

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (make setup)")

BLOCK = 32


def write_choices(path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, size=2))
        endings = [f" {a + b}", f" {a * b} and more", f" {a - b}."]
        lines.append(
            json.dumps({"context": f"{a} plus {b} is", "endings": endings, "label": int(rng.integers(3))})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def hf_loss_sums(folder, inputs, targets):
    """transformers' per-row sums of -log p(target) over the targets that are not IGNORE."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs)).logits.double()
    targets = torch.as_tensor(targets)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return losses.sum(dim=1).numpy()


def test_eval_equals_transformers_at_any_rank_count_and_tp(tmp_path):
    folder = make_folder(tmp_path / "llama", OPTIONS["a"])
    choices = write_choices(tmp_path / "choices.jsonl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{i} plus {i + 1} is {2 * i + 1}." for i in range(200)))
    data = tmp_path / "data"
    proc = run_hpcllm(["prepare", corpus, "--tokenizer", folder, "--out", data, "--val-ratio", "0.5"])
    assert proc.returncode == 0, proc.stderr
    results = {}
    for ranks, tp in ((None, 1), (4, 2)):
        out = tmp_path / f"eval-{ranks}-{tp}.json"
        args = [
            "eval",
            "--hf",
            folder,
            "--choices",
            choices,
            "--data",
            data,
            "--tp",
            tp,
            "--out",
            out,
            "--json",
        ]
        proc = run_hpcllm(args, ranks=ranks, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(ranks, tp)] = json.loads(out.read_text())
        assert printed["accuracy"] == results[(ranks, tp)]["accuracy"]
    one, four = results[(None, 1)], results[(4, 2)]
    assert one["accuracy"] == four["accuracy"] and one["accuracy_norm"] == four["accuracy_norm"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    # transformers on the same rows: every ending's log-likelihood, and the data's loss.
    tokenizer = tok.load(folder / "tokenizer.json")
    rows = example_rows(tokenizer, read_examples(choices), BLOCK)
    theirs = -hf_loss_sums(folder, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    ours = np.concatenate([example["loglik"] for example in one["per_example"]])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    windows = TokenWindows(open_prepared(data).tokens("val"), BLOCK)
    every = windows.rows(np.arange(windows.n_sequences))
    expected = hf_loss_sums(folder, every.tokens, every.targets).sum() / every.targets.size
    assert one["loss"] == pytest.approx(expected, rel=1e-4)


def test_bad_eval_input_is_one_line(tmp_path):
    folder = make_folder(tmp_path / "llama", OPTIONS["b"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "endings": [" a", " b"], "label": 2}) + "\n")
    assert_usage_error(run_hpcllm(["eval", "--hf", folder, "--choices", bad]), "bad.jsonl:1", "out of range")
    assert_usage_error(run_hpcllm(["eval", "--hf", folder]), "nothing to evaluate")
    assert_usage_error(
        run_hpcllm(["eval", "--hf", folder, "--run", tmp_path, "--choices", bad]), "exactly one"
    )
    out = tmp_path / "result.json"
    proc = run_hpcllm(["eval", "--hf", folder, "--choices", tmp_path / "missing.jsonl", "--out", out])
    assert_usage_error(proc, "does not exist")
    assert not out.exists()
