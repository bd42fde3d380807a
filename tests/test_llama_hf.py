"""The Llama family in and out of the Hugging Face world, checked against transformers'
`LlamaForCausalLM` itself (a test dependency; no network): every LlamaConfig option hpcllm supports
round-trips with equal logits, Llama tokenizers prepare data with their document tokens, a model
trained from a folder at tp 2 and at pp 2 exports to logits transformers reproduces, and folders
hpcllm cannot run are one line."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_usage_error, folder_variant, losses, run_hpcllm, sets, write_corpus
from safetensors.torch import save_file
from tokenizers import Tokenizer

from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import open_prepared
from hpcllm.errors import UsageError
from hpcllm.model import hf_llama
from hpcllm.model.llama import LLAMA
from hpcllm.model.registry import family_of_hf_folder

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (make setup)")

BLOCK = 32
BEGIN, END = "<|begin_of_text|>", "<|end_of_text|>"
# Every option that changes the arithmetic, away from its default (a) or at it (b).
OPTIONS = {
    "a": dict(
        head_dim=16,  # not hidden_size / heads = 8
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    ),
    "b": dict(tie_word_embeddings=True, num_key_value_heads=4),  # plain multi-head, tied
}


def llama_tokenizer():
    """A byte-level tokenizer with Llama 3's document tokens and no <|endoftext|>."""
    tokenizer = tok.byte_tokenizer()
    vocab = {token: i for token, i in tokenizer.get_vocab().items() if token != tok.EOT}
    vocab |= {BEGIN: 256, END: 257}
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in ((BEGIN, 256), (END, 257))
    ]  # fmt: skip
    data["model"]["vocab"] = vocab
    return Tokenizer.from_str(json.dumps(data))


def make_folder(path, options, seed=0):
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=BLOCK, bos_token_id=256, eos_token_id=257,
    )  # fmt: skip
    config = transformers.LlamaConfig(**(shape | options))
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "bias")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=llama_tokenizer(), bos_token=BEGIN, eos_token=END
    )
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-llama")
    return {name: make_folder(root / name, options) for name, options in OPTIONS.items()}


def hf_logits(folder, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


def hpcllm_model(folder):
    read = hf_llama.read_config(folder)
    model = LLAMA.build(read.shape, 0, None, True, True).eval()
    model.load_state_dict(hf_llama.read_weights(read))
    return read, model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_supported_option_round_trips_with_transformers_logits(folders, name, tmp_path):
    read, model = hpcllm_model(folders[name])
    assert family_of_hf_folder(folders[name]) is LLAMA
    ids = np.random.default_rng(1).integers(0, 258, (3, BLOCK))
    with torch.no_grad():
        ours = model(torch.as_tensor(ids))
    torch.testing.assert_close(ours, hf_logits(folders[name], ids), rtol=0, atol=1e-5)
    # Out again: config.json and the tensors transformers reads back to the same logits.
    out = tmp_path / "out"
    out.mkdir()
    boundaries = tok.DocumentTokens(256, 257)
    (out / "config.json").write_text(json.dumps(hf_llama.config_json(read.shape, boundaries)))
    save_file(hf_llama.to_hf(model.state_dict(), read.shape), out / "model.safetensors", {"format": "pt"})
    torch.testing.assert_close(hf_logits(out, ids), ours, rtol=0, atol=1e-5)
    original = json.loads((folders[name] / "config.json").read_text())
    again = transformers.LlamaConfig.from_pretrained(out)
    for key in ("head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert getattr(again, key) == original.get(key, getattr(transformers.LlamaConfig(), key)), key
    assert again.rope_parameters == transformers.LlamaConfig.from_pretrained(folders[name]).rope_parameters


def test_folders_hpcllm_cannot_run_are_one_line(folders, tmp_path):
    def variant(name, edit):
        return folder_variant(folders["a"], tmp_path / name, edit)

    cases = [
        (variant("gelu", lambda c: c.update(hidden_act="gelu")), "hidden_act 'gelu'"),
        (variant("yarn", lambda c: c["rope_parameters"].update(rope_type="yarn")), "rope_type 'yarn'"),
        (variant("tp", lambda c: c.update(pretraining_tp=2)), "pretraining_tp 2"),
        (variant("dropout", lambda c: c.update(attention_dropout=0.1)), "attention_dropout 0.1"),
        (variant("kv", lambda c: c.update(num_key_value_heads=3)), "not divisible by num_key_value_heads"),
        (variant("wide", lambda c: c.update(intermediate_size=96)), "config.json implies"),
        (variant("heads", lambda c: c.update(head_dim=8)), "config.json implies"),
    ]
    for folder, needle in cases:
        with pytest.raises(UsageError, match=re.escape(needle)):
            hf_llama.read_config(folder)


LLAMA_RUN = sets("train.global_batch=8", "train.micro_batch=2", "train.log_every=1", "model.block_size=32")


def test_train_from_a_folder_at_tp_and_pp_then_export(folders, tmp_path):
    """prepare with the folder's tokenizer (its document tokens around every document) -> train
    from the folder at tp 2 and at pp 2 -> export each: transformers' logits equal hpcllm's."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus)
    data = tmp_path / "data"
    proc = run_hpcllm(["prepare", corpus, "--tokenizer", folders["a"], "--out", data])
    assert proc.returncode == 0, proc.stderr
    prepared = open_prepared(data, verify=False)
    assert (prepared.manifest["tokenizer"]["bos_id"], prepared.eot_id) == (256, 257)
    stream = np.asarray(prepared.tokens("train"))
    assert stream[0] == 256 and stream[-1] == 257
    assert np.count_nonzero(stream == 256) == np.count_nonzero(stream == 257)  # one pair a document
    ids = np.random.default_rng(2).integers(0, 258, (2, BLOCK))
    for name, layout, ranks in (("tp2", ["--tp", "2"], 2), ("pp2", ["--pp", "2"], 2)):
        run, out = tmp_path / name, tmp_path / f"{name}-hf"
        proc = run_hpcllm(
            ["train", "--data", data, "--out", run, "--init-from", f"hf:{folders['a']}", "--steps", "2",
             *LLAMA_RUN, *layout],
            ranks=ranks,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert set(losses(run)) == {1, 2}
        proc = run_hpcllm(["export", "--run", run, "--format", "hf", "--out", out])
        assert proc.returncode == 0, proc.stderr
        assert "Llama" in proc.stdout and "LlamaForCausalLM" in proc.stdout
        from hpcllm.cluster import runtime
        from hpcllm.training.generate import load_model, run_checkpoint

        model, _, _, _ = load_model(run, run_checkpoint(run, None), runtime.init())
        with torch.no_grad():
            torch.testing.assert_close(hf_logits(out, ids), model(torch.as_tensor(ids)), rtol=0, atol=1e-5)
        config = json.loads((out / "config.json").read_text())
        assert config["bos_token_id"] == 256 and config["eos_token_id"] == 257
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        assert (tokenizer.bos_token, tokenizer.eos_token) == (BEGIN, END)


def test_bad_llama_settings_exit_2_without_a_run_directory(folders, data_dir, tmp_path):
    """Settings a Llama cannot have are one line each when the config loads (as every command
    loads it); a folder of another architecture and a tp the key/value heads do not divide go
    through `hpcllm train`, which exits 2 and creates nothing."""
    from hpcllm.training.config import load

    llama = ["model.preset=llama-tiny", "model.n_layer=2", "model.n_embd=32"]
    for extra, needle in (
        (["model.n_kv_head=3"], "model.n_head 4 is not divisible by model.n_kv_head 3"),
        (["model.rope_scaling=factor=8"], "model.rope_scaling 'factor=8': it lacks low_freq_factor"),
        (["model.rope_scaling=scale=8"], "'scale=8' is not one of factor=N"),
        (["model.dropout=0.1"], "the llama family trains without dropout"),
        (["model.family=gpt2"], "model.n_kv_head is a setting of the llama family"),  # the preset's
        (["model.preset=tiny", "model.tie_embeddings=false"], "model.tie_embeddings is a setting of"),
    ):
        with pytest.raises(UsageError, match=re.escape(needle)):
            load(assignments=[*llama, *extra])
    mistral = folder_variant(folders["b"], tmp_path / "mistral", lambda c: c.update(model_type="mistral"))
    flags = sets(*llama, "model.block_size=32", "train.global_batch=8", "train.micro_batch=2")
    for extra, ranks, needle in (
        (["--init-from", f"hf:{mistral}"], None, "'mistral' model"),
        (["--tp", "4"], 4, "model.n_kv_head 2 is not divisible by tp 4"),
    ):
        run = tmp_path / f"run-{ranks}"
        proc = run_hpcllm(["train", "--data", data_dir, "--out", run, *flags, *extra], ranks=ranks)
        if ranks:  # under mpirun, rank 0 speaks for all: exit 2 and the line
            assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        else:
            assert_usage_error(proc, needle)
        assert not run.exists(), needle


def test_greedy_generation_equals_transformers_generate(folders):
    """The same greedy tokens as `LlamaForCausalLM.generate`, prompts of several lengths batched
    (left-padded, each row's rotary positions its own) through hpcllm's grouped KV cache."""
    from hpcllm.model import inference

    _, model = hpcllm_model(folders["a"])
    hf = transformers.LlamaForCausalLM.from_pretrained(folders["a"]).eval()
    rng = np.random.default_rng(3)
    prompts = [[256, *rng.integers(0, 256, n).tolist()] for n in (2, 7, 12)]
    expected = []
    for prompt in prompts:
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=257, eos_token_id=None
        )
        expected.append(out[0, len(prompt) :].tolist())
    assert inference.generate(model, prompts, 10) == expected
