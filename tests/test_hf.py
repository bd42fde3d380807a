"""Models in and out of the Hugging Face world: `hpcllm export --format hf` and `train --init-from hf:DIR`,
checked against `transformers` itself (a test dependency; no network, no hub)."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_usage_error, folder_variant, losses, run_hpcllm, sets, train

from hpcllm.data import tokenizer as tok
from hpcllm.data.loader import BatchSampler
from hpcllm.data.sequences import TokenWindows, read_windows
from hpcllm.data.tokens import open_prepared
from hpcllm.errors import UsageError
from hpcllm.model import hf_gpt2
from hpcllm.model.gpt import GPT, GPTShape

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (make setup)")

SEED, GLOBAL_BATCH, BLOCK = 1337, 8, 32  # conftest's TINY


@pytest.fixture(scope="module")
def gpt2_folder(data_dir, tmp_path_factory):
    """A tiny GPT-2 built and saved by transformers, with the data's tokenizer as a fast tokenizer."""
    torch.manual_seed(0)
    vocab = open_prepared(data_dir, verify=False).vocab_size
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(data_dir / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def hf_logits(folder, ids):
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


def first_batch(data_dir):
    """The inputs and targets `hpcllm train` takes first (same sampler, seed and shapes)."""
    windows = TokenWindows(open_prepared(data_dir, verify=False).tokens("train"), BLOCK)
    indices = BatchSampler(windows.n_sequences, SEED).global_indices(0, GLOBAL_BATCH)
    return read_windows(windows.tokens, indices, BLOCK)


def first_batch_loss(folder, data_dir):
    """transformers' loss on the batch `hpcllm train` takes first (same sampler, seed and shapes)."""
    inputs, targets = first_batch(data_dir)
    logits = hf_logits(folder, inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1)).item()


def hpcllm_logits(run, ids):
    """hpcllm's own logits from the run's latest checkpoint, joined to one process as generate does."""
    from hpcllm.cluster import runtime
    from hpcllm.training.generate import load_model, run_checkpoint

    model, _, _, _ = load_model(run, run_checkpoint(run, None), runtime.init())
    with torch.no_grad():
        return model(torch.as_tensor(ids))


def assert_export_matches(run, out, data_dir):
    proc = run_hpcllm(["export", "--run", run, "--format", "hf", "--out", out])
    assert proc.returncode == 0, proc.stderr
    ids = np.random.default_rng(0).integers(0, open_prepared(data_dir, verify=False).vocab_size, (2, BLOCK))
    torch.testing.assert_close(hf_logits(out, ids), hpcllm_logits(run, ids), rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = open_prepared(data_dir, verify=False)
    text = "def rank(self):\n    return grad"
    assert tokenizer(text)["input_ids"] == tok.load(ours.tokenizer_path).encode(text).ids


def test_a_transformers_gpt2_and_hpcllm_give_the_same_logits(gpt2_folder):
    folder = hf_gpt2.read_config(gpt2_folder)
    shape = GPTShape(folder.vocab_size, folder.block_size, folder.n_layer, folder.n_head, folder.n_embd)
    model = GPT(shape, seed=0).eval()
    model.load_state_dict(hf_gpt2.read_weights(folder))
    ids = np.random.default_rng(1).integers(0, folder.vocab_size, (3, BLOCK))
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.as_tensor(ids)), hf_logits(gpt2_folder, ids), rtol=0, atol=1e-5
        )
    assert set(hf_gpt2.to_hf(model.state_dict(), shape)) == set(
        transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).state_dict()
    ) - {"lm_head.weight"}  # tied: save_pretrained leaves it out too


def test_init_from_hf_at_tp_and_pp_then_export_round_trip(gpt2_folder, data_dir, tmp_path):
    """hf folder -> train at tp 2 (first loss = transformers' on that batch) -> export (logits match
    hpcllm's) -> train from the export at pp 2 (first loss = transformers' on the export) -> export
    of the pp checkpoint; the same at zero = 3."""
    tp_run, pp_run = tmp_path / "tp2", tmp_path / "pp2"
    proc = train(data_dir, tp_run, "--init-from", f"hf:{gpt2_folder}", "--tp", "2", "--steps", "2", ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert losses(tp_run)[1] == pytest.approx(first_batch_loss(gpt2_folder, data_dir), rel=1e-5)
    assert "initialised from" in (tp_run / "logs" / "rank-0.log").read_text()
    exported = tmp_path / "tp2-hf"
    assert_export_matches(tp_run, exported, data_dir)

    proc = train(data_dir, pp_run, "--init-from", f"hf:{exported}", "--pp", "2", "--steps", "1", ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert losses(pp_run)[1] == pytest.approx(first_batch_loss(exported, data_dir), rel=1e-5)
    assert_export_matches(pp_run, tmp_path / "new" / "pp2-hf", data_dir)  # missing folders are made
    # Fully sharded at dp 2: read unit by unit into each rank's shares; exported from their parts.
    z3_run = tmp_path / "zero3"
    proc = train(
        data_dir, z3_run, "--init-from", f"hf:{exported}", "--set", "parallel.zero=3", "--steps", "1", ranks=2
    )
    assert proc.returncode == 0, proc.stderr
    assert losses(z3_run)[1] == pytest.approx(first_batch_loss(exported, data_dir), rel=1e-5)
    assert_export_matches(z3_run, tmp_path / "zero3-hf", data_dir)
    # An existing folder is never written over.
    assert_usage_error(
        run_hpcllm(["export", "--run", pp_run, "--out", exported]), "already exists", "not an empty folder"
    )


def test_folders_that_are_not_gpt2_shaped_are_one_line(gpt2_folder, data_dir, tmp_path):
    def variant(name, edit_config=None, drop=()):
        return folder_variant(gpt2_folder, tmp_path / name, edit_config, drop)

    cases = [
        (variant("llama", lambda c: c.update(model_type="llama")), "'llama' model"),
        (variant("relu", lambda c: c.update(activation_function="relu")), "activation 'relu'"),
        (variant("no-tokenizer", drop=("tokenizer.json",)), "no tokenizer.json"),
        (variant("pickled", drop=("model.safetensors",)), "no model.safetensors"),
        (variant("other-vocab", lambda c: c.update(vocab_size=300)), "config.json implies"),
        (tmp_path / "missing", "config.json missing"),
    ]
    other = variant("other-tokenizer")
    (other / "tokenizer.json").write_text(tok.train_bpe(["some other text"] * 50, 300).to_str())
    cases.append((other, "another tokenizer"))
    (cases[3][0] / "pytorch_model.bin").write_bytes(b"not opened")
    cases[3] = (cases[3][0], "pickle format")
    # The folder's own faults are found by reading it (in this process, one line each); the two
    # found only against the run (the data's tokenizer) or by its options go through `hpcllm train`.
    for folder, needle in cases[:-1]:
        with pytest.raises(UsageError, match=re.escape(needle)):
            hf_gpt2.read_config(folder)
    for folder, needle in [(other, "another tokenizer"), (cases[3][0], "pickle format")]:
        proc = train(data_dir, tmp_path / f"run-{folder.name}", "--init-from", f"hf:{folder}")
        assert_usage_error(proc, needle)
        assert not (tmp_path / f"run-{folder.name}").exists(), folder.name
    assert_usage_error(train(data_dir, tmp_path / "r", "--init-from", str(gpt2_folder)), "takes hf:DIR")


def test_init_from_an_hpcllm_run_at_another_layout_with_a_fresh_optimizer(data_dir, tmp_path):
    """run:DIR@STEP: the new run's first loss is that checkpoint's model on the new run's first
    batch (so its weights, resharded from tp 2 to tp 1), its schedule starts again (warmup's first
    learning rate), and a run or step that is not there is one line."""
    base = tmp_path / "base"
    proc = train(
        data_dir, base, "--steps", "4", "--tp", "2", *sets("train.ckpt_every=2", "train.keep=5"), ranks=2
    )
    assert proc.returncode == 0, proc.stderr
    tuned = tmp_path / "tuned"
    proc = train(data_dir, tuned, "--init-from", f"run:{base}@2", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert losses(tuned)[1] == pytest.approx(
        first_batch_loss_of_run(base, "step-00000002", data_dir), rel=1e-5
    )
    first = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == json.loads((base / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    for source, needle in (
        (f"run:{tmp_path / 'none'}", "is not an hpcllm run directory"),
        (f"run:{base}@9", "has no checkpoint step-00000009"),
        (f"run:{base}@x", "the step after @ must be a number"),
    ):
        assert_usage_error(train(data_dir, tmp_path / "r", "--init-from", source), needle)
        assert not (tmp_path / "r").exists()


def first_batch_loss_of_run(run, step_name, data_dir):
    """hpcllm's loss, from a run's checkpoint, on the batch `hpcllm train` takes first."""
    from hpcllm.cluster import runtime
    from hpcllm.training.checkpoint import run_checkpoint
    from hpcllm.training.generate import load_model

    inputs, targets = first_batch(data_dir)
    model, _, _, _ = load_model(run, run_checkpoint(run, step_name), runtime.init())
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1)).item()
