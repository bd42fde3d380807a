"""Fine-tuning data: chat templates as transformers renders them, loss masks from the rendered text,
packing without cross-contamination (a sample's loss and gradients are those it has alone), and
`hpcllm prepare --format sft` byte-identical over ranks, with bad records counted."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_usage_error, run_hpcllm

from hpcllm.batch import IGNORE, Batch
from hpcllm.data.chat import BUILT_IN, ChatTemplate
from hpcllm.data.packing import PackedSamples, best_fit_decreasing
from hpcllm.data.sequences import TokenWindows
from hpcllm.data.sft import SftEncoder
from hpcllm.data.tokenizer import document_tokens, train_bpe
from hpcllm.model.gpt2 import GPT2
from hpcllm.model.llama import LLAMA
from hpcllm.model.registry import PRESETS

# Two real templates' styles, written out: ChatML (Qwen, SmolLM) and Llama 3's headers.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
SPECIAL += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And twice that?"},
    {"role": "assistant", "content": "84"},
]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE whose merges span the template's text and the replies (newline + digits)."""
    from tokenizers import AddedToken

    text = [f"assistant\n{a}{b} user\n\n{b}{a}<|im_end|>\n" * 3 for a in range(10) for b in range(10)]
    tokenizer = train_bpe(text, 400)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    return tokenizer


def hf_render(template, messages, add_generation_prompt, tmp_path):
    """transformers' own rendering of a template (PreTrainedTokenizerFast.apply_chat_template)."""
    from transformers import PreTrainedTokenizerFast

    from hpcllm.data.tokenizer import byte_tokenizer

    hf = PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(), bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"
    )
    hf.chat_template = template
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [CHATML, LLAMA3, BUILT_IN], ids=["chatml", "llama3", "built-in"])
def test_templates_render_as_transformers_does_and_train_exactly_the_replies(template, bpe, tmp_path):
    ours = ChatTemplate(template, "<|begin_of_text|>", "<|endoftext|>")
    for generation in (False, True):
        assert ours.render(CONVERSATION, generation) == hf_render(
            template, CONVERSATION, generation, tmp_path
        )
    boundaries = document_tokens(bpe)
    for train_on, replies in (("assistant", ["42", "84"]), ("last", ["84"])):
        sample = SftEncoder(bpe, ours, boundaries, train_on).encode({"messages": CONVERSATION})
        trained = [bpe.decode([int(i)], skip_special_tokens=False) for i in sample.ids[sample.mask == 1]]
        text = "".join(trained)
        # The replies and what the template closes them with, and nothing of the prompts.
        assert all(reply in text for reply in replies) and "plus" not in text and "twice" not in text
        assert text.count("<|im_end|>") + text.count("<|eot_id|>") + text.count("<|endoftext|>") == len(
            replies
        )
    everything = SftEncoder(bpe, ours, boundaries, "all").encode({"messages": CONVERSATION})
    assert everything.mask[0] == 0 and everything.mask[1:].all()


def test_a_token_merging_template_text_and_reply_is_trained():
    """A template whose generation prompt ends in a space: byte-level BPE joins that space with the
    reply's digits into one token (" 42"), which starts before the reply. It is trained (the model
    must produce it), so no reply character is left out at the edge."""
    tokenizer = train_bpe([f"assistant: {a}{b}\n" * 3 for a in range(10) for b in range(10)], 400)
    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        "",
        "<|endoftext|>",
    )
    sample = SftEncoder(tokenizer, template, document_tokens(tokenizer)).encode(
        {"messages": CONVERSATION[:3]}
    )
    pieces = [tokenizer.decode([int(i)]) for i in sample.ids]
    assert " 42" in pieces, pieces  # the merge across the reply's edge happened
    trained = [p for p, m in zip(pieces, sample.mask, strict=True) if m]
    assert trained == [" 42", "\n"]


def test_prompt_completion_records_and_what_cannot_be_a_sample(bpe):
    boundaries = document_tokens(bpe)
    encoder = SftEncoder(bpe, ChatTemplate(BUILT_IN, "", "<|endoftext|>"), boundaries, max_tokens=40)
    sample = encoder.encode({"prompt": "What is 2 plus 3? ", "completion": "5"})
    assert sample.ids[-1] == boundaries.eos and sample.mask[-1] == 1 and not sample.truncated
    assert (
        bpe.decode([int(i) for i in sample.ids[sample.mask == 1]], skip_special_tokens=False)
        == "5<|endoftext|>"
    )
    long = {"prompt": "word " * 50, "completion": "yes"}
    assert encoder.encode(long) == "no_trained_token"  # truncated to 40 tokens of prompt
    assert (
        SftEncoder(bpe, encoder.template, boundaries, too_long="drop", max_tokens=40).encode(long)
        == "too_long"
    )
    user_last = {"messages": CONVERSATION[:2]}
    assert encoder.encode(user_last) == "no_trained_token"
    assert SftEncoder(bpe, encoder.template, boundaries, "last").encode(user_last) == "last_not_assistant"
    assert encoder.encode({"text": "x"}) == "missing_field"
    assert encoder.encode({"messages": [{"role": "robot", "content": "x"}]}) == "bad_messages"
    failing = ChatTemplate("{{ raise_exception('no system role') }}", "", "<|endoftext|>")
    assert SftEncoder(bpe, failing, boundaries).encode({"messages": CONVERSATION}) == "template_error"
    dated = ChatTemplate(
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "", ""
    )
    assert SftEncoder(bpe, dated, boundaries).encode({"messages": CONVERSATION}) == "template_mismatch"


# ---- packing ----------------------------------------------------------------------------------


def test_best_fit_decreasing_fills_rows_and_depends_on_the_lengths_alone():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 65, size=500)
    bins = best_fit_decreasing(sizes, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(sizes[i] for i in b) for b in bins) <= 64
    assert len(bins) <= int(np.ceil(sizes.sum() / 64 * 1.1)) + 1  # within 10% of the bound
    assert bins == best_fit_decreasing(sizes.copy(), 64)


def samples_of(lengths, vocab=50, seed=0):
    """PackedSamples over random samples of the given lengths, half of each one's tokens trained."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=sum(lengths))
    mask = (rng.random(sum(lengths)) < 0.5).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    mask[starts[:-1]] = 0
    return tokens, mask, starts


def test_packed_rows_restart_positions_and_keep_samples_apart():
    tokens, mask, starts = samples_of([5, 9, 3, 17, 20, 4])
    packed = PackedSamples(tokens, mask, starts, block_size=16, pad_id=0, packing=True)
    assert packed.truncated == 1  # 17 tokens give 16 positions and fit; 20 are cut to 17
    batch = packed.rows(np.arange(packed.n_sequences))
    for row in range(packed.n_sequences):
        documents, positions = batch.documents[row], batch.positions[row]
        for document in np.unique(documents):
            where = np.flatnonzero(documents == document)
            assert np.array_equal(positions[where], np.arange(len(where)))
    ends = np.minimum(starts[1:], starts[:-1] + 17)
    trained = sum(int(mask[s + 1 : e].sum()) for s, e in zip(starts[:-1], ends, strict=True))
    assert (batch.targets != IGNORE).sum() == trained


def _llama_shape():
    keys = dict(PRESETS["llama-tiny"][1], n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64)
    return LLAMA, LLAMA.shape(SimpleNamespace(**dict(keys, block_size=32), dropout=0.0), 50)


def _gpt2_shape():
    from hpcllm.model.gpt2_shape import GPTShape

    return GPT2, GPTShape(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("shape_of", [_gpt2_shape, _llama_shape], ids=["gpt2", "llama"])
def test_a_samples_loss_and_gradients_are_the_same_packed_padded_and_alone(shape_of):
    family, shape = shape_of()
    model = family.build(shape, 0, None, True, True).double()
    tokens, mask, starts = samples_of([7, 12, 5, 9, 20, 3], vocab=50, seed=1)

    def loss_and_grads(batch, which):
        """The loss sum over the targets of one sample (`which`: [rows, time] bool), and its gradients."""
        model.zero_grad()
        device = batch.to_device(torch.device("cpu"))
        logits = model(device.tokens, device.positions, mask=device.attention)
        keep = torch.where(torch.as_tensor(which), device.targets, IGNORE)
        loss = model.loss_sum(logits, keep)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    packed = PackedSamples(tokens, mask, starts, block_size=32, pad_id=0, packing=True)
    padded = PackedSamples(tokens, mask, starts, block_size=32, pad_id=0, packing=False)
    for sample in range(len(starts) - 1):
        row = next(i for i, members in enumerate(packed.bins) if sample in members)
        batch = packed.rows(np.array([row]))
        document = packed.bins[row].index(sample)
        in_packed = loss_and_grads(batch, batch.documents == document)
        alone = loss_and_grads(padded.rows(np.array([sample])), np.ones((1, 32), dtype=bool))
        among = padded.rows(np.arange(len(starts) - 1))  # padded, in a batch of all samples
        in_batch = loss_and_grads(among, np.arange(len(starts) - 1)[:, None] == sample)
        for other in (in_packed, in_batch):
            assert other[0] == pytest.approx(alone[0], rel=1e-10)
            for a, b in zip(other[1], alone[1], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_document_masked_windows_restart_at_each_document_end():
    eos = 0
    stream = np.array([5, 6, eos, 7, 8, 9, eos, 4, 3, 2, 1, eos, 6], dtype=np.uint16)
    rows = TokenWindows(stream, block_size=6, eos=eos).rows(np.array([0, 1]))
    assert rows.positions[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert rows.documents[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert rows.targets[0].tolist() == [6, eos, IGNORE, 8, 9, eos]
    assert rows.positions[1].tolist() == [0, 0, 1, 2, 3, 4]
    plain = TokenWindows(stream, block_size=6).rows(np.array([0]))
    assert plain.positions is None and isinstance(plain, Batch)


# ---- prepare --format sft over ranks ----------------------------------------------------------


def write_records(path, n=300, seed=0):
    """Prompt/completion and chat records of very different lengths, with some bad ones."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        filler = " please" * int(rng.integers(0, 20))
        if i % 3 == 0:  # every fifth of these with a long completion, which --max-tokens 200 cuts
            tail = " and that is all" * (20 if i % 5 == 0 else 0)
            lines.append({"prompt": f"Add {a} and {b}{filler}: ", "completion": f"{a + b}{tail}"})
        else:
            turns = [{"role": "user", "content": f"What is {a} plus {b}?{filler}"}]
            turns.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
            lines.append({"messages": turns})
    text = "\n".join(json.dumps(line) for line in lines)
    bad = ['{"prompt": "no completion"}', "not json", '{"messages": [{"role": "user", "content": "hi"}]}']
    path.write_text(text + "\n" + "\n".join(bad) + "\n")
    return path


def test_prepare_sft_is_byte_identical_over_ranks_and_counts_what_it_left_out(tmp_path):
    source = write_records(tmp_path / "records.jsonl")
    common = [
        str(source),
        "--format",
        "sft",
        "--tokenizer",
        "byte",
        "--chunk-mb",
        "0.01",
        "--max-tokens",
        "200",
    ]
    outputs = {}
    for ranks in (None, 2, 3):
        out = tmp_path / f"out{ranks}"
        proc = run_hpcllm(["prepare", *common, "--out", str(out)], ranks=ranks, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[ranks] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outputs[None] == outputs[2] == outputs[3]
    manifest = json.loads(outputs[None]["manifest.json"])
    bad = manifest["files"]["bad_jsonl_by_kind"]
    assert (bad["missing_field"], bad["not_json"], bad["no_trained_token"]) == (1, 1, 1)
    samples = sum(manifest["splits"][s]["samples"] for s in ("train", "val"))
    assert samples == 300 and manifest["sft"]["truncated"] > 0
    lengths = np.frombuffer(outputs[None]["train.lengths.bin"], dtype=np.uint32)
    mask = np.frombuffer(outputs[None]["train.mask.bin"], dtype=np.uint8)
    assert lengths.sum() == manifest["splits"]["train"]["tokens"] and lengths.max() == 200
    train = manifest["splits"]["train"]
    assert mask.sum() == train["trained_tokens"] > 0 and train["masked_tokens"] == mask.size - mask.sum()


def test_prepare_sft_refuses_what_it_cannot_read_and_writes_nothing(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("plain text")
    records = str(write_records(tmp_path / "r.jsonl", n=5))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }\n")
    for args, needle in (
        ([str(text), "--tokenizer", "byte"], "reads JSONL records"),
        ([records, "--tokenizer", "bpe"], "tokenizer of the model"),
        (
            [records, "--tokenizer", "byte", "--prompt-field", "q", "--messages-field", "m"],
            "no record became",
        ),
        ([records, "--tokenizer", "byte", "--chat-template", str(tmp_path / "none.jinja")], "does not exist"),
        ([records, "--tokenizer", "byte", "--chat-template", str(broken)], "does not parse"),
    ):
        out = tmp_path / "out"
        proc = run_hpcllm(["prepare", *args, "--format", "sft", "--out", str(out)])
        assert_usage_error(proc, needle)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_generation_stops_at_an_end_of_turn_token():
    from hpcllm.model.inference import generate

    family, shape = _gpt2_shape()
    model = family.build(shape, 0, None, True, True).eval()
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, 6)
    stop = frozenset([free[0][-1]])  # a token the first row produces ends its reply
    stopped = generate(model, prompts, 6, stop=stop)
    for row, whole in zip(stopped, free, strict=True):
        assert row == next((whole[:i] for i, token in enumerate(whole) if token in stop), whole)
    assert len(stopped[0]) < len(free[0])


def test_a_chat_template_that_cannot_render_a_prompt_is_a_usage_error():
    from hpcllm.data.chat import encode_chat_prompts
    from hpcllm.data.tokenizer import byte_tokenizer
    from hpcllm.errors import UsageError

    failing = ChatTemplate("{{ raise_exception('no system role') }}", "", "<|endoftext|>")
    with pytest.raises(UsageError, match="cannot render a prompt \\(no system role\\)"):
        encode_chat_prompts(byte_tokenizer(), failing, ["hi"], system="be brief")
