"""train.loss_chunk: the head and its loss N tokens at a time, each chunk's gradients made with its
loss, so the logits never exist whole. The same loss and gradients as the whole head, in one process
and at every layout; fewer bytes kept for backward."""

from types import SimpleNamespace

import torch
from conftest import TINY, assert_same_losses, assert_usage_error, losses, run_hpcllm, sets

from hpcllm.batch import IGNORE
from hpcllm.model.gpt import GPT, GPTShape
from hpcllm.model.llama import LLAMA
from hpcllm.observe.memory import saved_activation_bytes

LLAMA_SHAPE = dict(
    preset="llama-tiny", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64, block_size=24
)


def test_chunks_give_the_whole_heads_loss_and_gradients_with_fewer_saved_bytes():
    gpt2 = GPT(GPTShape(vocab_size=300, block_size=24, n_layer=2, n_head=2, n_embd=32), seed=3)
    llama_shape = LLAMA.shape(SimpleNamespace(**LLAMA_SHAPE, dropout=0.0, tie_embeddings=False), 300)
    for model in (gpt2, LLAMA.build(llama_shape, 3, None, True, True)):
        ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
        targets = torch.roll(ids, -1, dims=1)
        targets[0, :5] = IGNORE  # masked targets count nowhere, in any chunk
        results = []
        for chunk in (0, 7, 72):  # whole; a remainder chunk; one chunk of everything
            model.zero_grad()
            model.loss_chunk = chunk
            loss = model.sequence_loss_sum(ids, targets)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results.append((loss.item(), grads, saved_activation_bytes(model, ids, targets)))
        (whole, whole_grads, whole_bytes), *chunked = results
        for loss, grads, _ in chunked:
            assert abs(loss - whole) <= 1e-6 * whole
            for name, grad in grads.items():
                torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        # Kept for backward: the rows' and the weight's gradients (tokens x width, vocabulary x width)
        # instead of the micro-batch's log-probabilities (tokens x vocabulary).
        logits_bytes, kept_bytes = 3 * 24 * 300 * 4, (3 * 24 + 300) * 32 * 4
        assert chunked[0][2] <= whole_bytes - logits_bytes + kept_bytes


def test_chunked_loss_at_tp2_and_pp2_dp2_zero3_matches_the_whole_head(data_dir, tmp_path):
    def run(name, ranks, *flags):
        out = tmp_path / name
        proc = run_hpcllm(
            [
                "train",
                "--data",
                data_dir,
                "--out",
                out,
                *TINY,
                "--steps",
                20,
                *sets("train.eval_every=0"),
                *flags,
            ],
            ranks=ranks,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses(out)

    reference = run("whole", None)
    chunk = sets("train.loss_chunk=5")
    assert_same_losses(reference, run("chunk-tp2", 2, "--tp", 2, *chunk), "tp2")
    assert_same_losses(
        reference, run("chunk-pp2-zero3", 4, "--pp", 2, *chunk, *sets("parallel.zero=3")), "pp2"
    )
    proc = run_hpcllm(
        ["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--tp", 2, *chunk]
        + sets("parallel.sequence_parallel=true"),
        ranks=2,
    )
    assert_usage_error(proc, "parallel.sequence_parallel does not support yet")
    assert not (tmp_path / "r").exists()
