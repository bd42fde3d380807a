"""Training on fine-tuning samples of very different lengths: the loss counts trained tokens only,
normalised over the global batch, so packed and padded runs give the single-process losses at any
micro-batch size, dp, tp, pp, sequence and context parallelism; document-masked pretraining
likewise."""

import json

import pytest
from conftest import assert_same_losses, losses, run_hpcllm, sets
from test_eval import write_choices
from test_sft import write_records

BLOCK = 64
COMMON = sets(
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=4",
    f"model.block_size={BLOCK}",
    "train.global_batch=8",
    "train.log_every=1",
    "train.eval_every=100",
    "train.warmup=2",
    "train.peak_flops=1e9",
)
LLAMA = sets("model.preset=llama-tiny", "model.n_kv_head=2", "model.ffn_hidden=64")
GPT2 = sets("model.preset=tiny")
SP = sets("parallel.sequence_parallel=true")
PADDED = sets("data.packing=false")


@pytest.fixture(scope="module")
def sft_dir(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    source = write_records(root / "records.jsonl", n=300)
    out = root / "data"
    args = ["prepare", source, "--format", "sft", "--tokenizer", data_dir, "--out", out]
    proc = run_hpcllm([*args, "--max-tokens", BLOCK + 1])
    assert proc.returncode == 0, proc.stderr
    return out


def train(data, out, flags, ranks=None):
    proc = run_hpcllm(["train", "--data", data, "--out", out, *COMMON, "--steps", 6, *flags], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


# name -> (ranks, flags): each against the single-process run at micro-batch 8 of its own model.
PACKED_LAYOUTS = {
    "micro-batch-1": (None, sets("train.micro_batch=1")),
    "dp4": (4, sets("train.micro_batch=2")),
    "pp2xtp2-sp": (4, ["--pp", 2, "--tp", 2, *sets("train.micro_batch=1"), *SP]),
}
PADDED_LAYOUTS = {"dp2-micro-batch-1": (2, sets("train.micro_batch=1"))}
DOCUMENT_MASK_LAYOUTS = {"pp2xtp2-sp": (4, ["--pp", 2, "--tp", 2, *sets("train.micro_batch=2"), *SP])}
# Context parallelism: each rank holds 1/cp of every packed row, with the samples' documents,
# positions and trained-token masks (and of every task row, whose loss sums add up over cp).
PACKED_LAYOUTS["cp2xdp2"] = (4, ["--cp", 2, *sets("train.micro_batch=2")])


def test_packed_and_padded_samples_train_alike_at_every_layout(sft_dir, data_dir, tmp_path):
    tasks = sets(f"train.eval_tasks={write_choices(tmp_path / 'choices.jsonl', n=10)}", "train.eval_every=6")
    groups = (
        ("packed-llama", sft_dir, [*LLAMA, *tasks], PACKED_LAYOUTS),
        ("padded-gpt2", sft_dir, [*GPT2, *PADDED], PADDED_LAYOUTS),
        ("document-mask-gpt2", data_dir, [*GPT2, *sets("data.document_mask=true")], DOCUMENT_MASK_LAYOUTS),
    )
    for group, data, model, layouts in groups:
        reference = train(data, tmp_path / group, [*model, *sets("train.micro_batch=8")])
        for name, (ranks, flags) in layouts.items():
            got = train(data, tmp_path / f"{group}-{name}", [*model, *flags], ranks)
            assert_same_losses(reference, got, f"{group} {name}")

    # The tasks' accuracy is logged beside the loss, alike at every layout (within one example of
    # ten: the losses agree to 1e-3, so two endings of nearly equal likelihood may swap).
    def accuracy(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(row["accuracy"] for row in rows if "accuracy" in row)

    reference = accuracy(tmp_path / "packed-llama")
    for name in PACKED_LAYOUTS:
        assert abs(accuracy(tmp_path / f"packed-llama-{name}") - reference) <= 0.1 + 1e-9, name
    # `hpcllm eval` reads the pp2 x tp2 run's checkpoint whole, or at tp 2: the same loss.
    results = []
    for ranks, tp in ((None, 1), (2, 2)):
        out = tmp_path / f"eval-{tp}.json"
        args = [
            "eval",
            "--run",
            tmp_path / "packed-llama-pp2xtp2-sp",
            "--data",
            sft_dir,
            "--tp",
            tp,
            "--out",
            out,
        ]
        proc = run_hpcllm(args, ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5) and results[0]["tokens"] > 0

    # The run kept its data's chat template; generate --chat renders a prompt with it and prints
    # the reply only.
    run = tmp_path / "packed-llama"
    assert (run / "chat_template.jinja").read_text() == (sft_dir / "chat_template.jinja").read_text()
    args = ["generate", "--run", run, "--chat", "--prompt", "What is 2 plus 3?", "--temperature", 0]
    proc = run_hpcllm([*args, "--max-new-tokens", 8])
    assert proc.returncode == 0 and "What is" not in proc.stdout, proc.stderr[-2000:]
