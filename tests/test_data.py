"""Data: prepare (single and multi-rank, byte-identical), bad input, and the per-rank sampler."""

import gzip
import json

import numpy as np
import pytest
import zstandard
from conftest import assert_usage_error, run_hpcllm

from hpcllm.data.loader import BatchSampler, micro_batches, sequences_in
from hpcllm.data.sequences import TokenWindows
from hpcllm.data.tokens import choose_dtype, open_prepared
from hpcllm.errors import UsageError


def prepare(args, ranks=None):
    return run_hpcllm(["prepare", *args], ranks=ranks)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Files of very different sizes, a JSONL file, a non-UTF-8 file and an empty file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "rank", "tensor", "pipeline", "allreduce", "\n", "def", "("]
    for i in range(12):
        n = int(rng.integers(20, 3000))
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=n)))
    records = [{"text": " ".join(rng.choice(words, size=50))} for _ in range(30)]
    lines = [json.dumps(r).encode() for r in records] + [b"not json", json.dumps({"other": "x"}).encode()]
    lines.append(b'{"text": "caf\xe9"}')  # not UTF-8
    (root / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.txt").write_text("")
    # Compressed JSONL, and one JSONL file much larger than the rest (cut into ranges by --chunk-mb).
    compressed = "\n".join(json.dumps({"text": " ".join(rng.choice(words, size=40))}) for _ in range(20))
    (root / "more.jsonl.gz").write_bytes(gzip.compress(compressed.encode()))
    (root / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(compressed.encode()))
    big = [
        json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(5, 200))))}) for _ in range(400)
    ]
    (root / "big.jsonl").write_text("\n".join(big) + "\n")
    return root


CORPUS_DOCUMENTS = 12 + 30 + 20 + 20 + 400  # text files, records.jsonl, .gz, .zst, big.jsonl


def test_prepare_on_one_two_and_three_ranks_gives_identical_output(corpus_dir, tmp_path):
    """Text, JSONL (bad records of every kind), .jsonl.gz, .jsonl.zst, and one JSONL file cut into
    byte ranges: the same bytes for 1, 2 and 3 ranks."""
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    args = [corpus_dir, "--vocab-size", "300", "--chunk-mb", "0.01"]  # big.jsonl: ~6 ranges of 10 KiB
    first = prepare([*args, "--out", one])
    assert first.returncode == 0, first.stderr
    for ranks, out in ((2, two), (3, three)):
        proc = prepare([*args, "--out", out], ranks=ranks)
        assert proc.returncode == 0, proc.stderr
        for name in ("train.bin", "val.bin", "manifest.json", "tokenizer.json"):
            assert (one / name).read_bytes() == (out / name).read_bytes(), (ranks, name)
    manifest = json.loads((one / "manifest.json").read_text())
    files = manifest["files"]
    assert (files["skipped_not_utf8"], files["skipped_empty"], files["bad_jsonl_records"]) == (1, 1, 3)
    assert files["bad_jsonl_by_kind"] == {"not_json": 1, "missing_field": 1, "not_utf8": 1}
    assert files["pieces"] > files["read"]  # big.jsonl was cut
    assert "1 not UTF-8, 1 empty" in first.stdout and "3 bad JSONL records" in first.stdout
    assert "1 not json, 1 missing field, 1 not utf8" in first.stdout
    documents = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert documents == CORPUS_DOCUMENTS
    [source] = manifest["per_source"]
    assert source["documents"] == documents and source["files"] == files["read"]
    assert source["tokens"] == manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 300
    prepared = open_prepared(one)
    assert prepared.tokens("train").max() < 300
    assert not list(tmp_path.glob(".*tmp-*")), "staging directories must not be left behind"


def test_byte_tokenizer_round_trips_text(tmp_path):
    """Too few documents for a document split: the token stream is cut instead, and on two ranks
    rank 0 reads the other rank's spool to do it."""
    from tokenizers import Tokenizer

    texts = {"a.txt": "héllo wörld\n" * 20, "b.txt": "zweites Dokument\n" * 7}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    for ranks, names in ((None, ["a.txt"]), (2, ["a.txt", "b.txt"])):
        out = tmp_path / f"out{len(names)}"
        proc = prepare([*(tmp_path / n for n in names), "--tokenizer", "byte", "--out", out], ranks=ranks)
        assert proc.returncode == 0, proc.stderr
        prepared = open_prepared(out)
        assert prepared.vocab_size == 257 and prepared.eot_id == 256
        assert prepared.manifest["split_by"] == "tokens"
        tok = Tokenizer.from_file(str(prepared.tokenizer_path))
        stream = np.concatenate([prepared.tokens("train"), prepared.tokens("val")])
        assert tok.decode(stream.tolist()) == "".join(texts[n] for n in names)  # end-of-text skipped


def test_missing_path_is_refused(tmp_path):
    assert_usage_error(prepare([tmp_path / "nope.txt", "--out", tmp_path / "o"]), "does not exist")
    assert not (tmp_path / "o").exists()


def test_empty_corpus_is_refused_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    (src / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    assert_usage_error(prepare([src, "--out", tmp_path / "o"]), "no documents", "1 not-utf8", "1 empty")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_a_field_no_record_has_is_refused_and_named(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)) + "\n")
    proc = prepare([records, "--field", "body", "--out", tmp_path / "o"])
    assert_usage_error(proc, "5 bad JSONL records", "none has a text field 'body'", "--field")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_existing_output_is_never_overwritten_without_force(corpus_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("keep me")
    assert_usage_error(prepare([corpus_dir, "--out", out]), "not empty", "--force")
    assert (out / "precious").read_text() == "keep me"


def test_vocabulary_too_large_for_dtype():
    with pytest.raises(UsageError, match="does not fit uint16"):
        choose_dtype(70000, "uint16")
    assert choose_dtype(70000) == np.uint32 and choose_dtype(4096) == np.uint16


def test_checksum_mismatch_is_detected(corpus_dir, tmp_path):
    out = tmp_path / "o"
    assert prepare([corpus_dir, "--tokenizer", "byte", "--out", out]).returncode == 0
    data = bytearray((out / "train.bin").read_bytes())
    data[10] ^= 0xFF
    (out / "train.bin").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match the checksum"):
        open_prepared(out)


def test_corpus_smaller_than_one_sequence():
    with pytest.raises(UsageError, match="fewer than one sequence of block_size \\+ 1 = 65"):
        sequences_in(n_tokens=50, block_size=64)


# ---- the sampler ---------------------------------------------------------------------------

G = 8  # global batch of these tests


def _slices(sampler, step, dp, global_batch=G):
    return [sampler.rank_indices(step * global_batch, global_batch, r, dp) for r in range(dp)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_slices_partition_the_global_batch(dp):
    sampler = BatchSampler(sequences_in(10_000, 16), seed=3)
    for step in (0, 1, 7, 77, 78):  # 624 sequences: step 77/78 straddle the first epoch boundary
        slices = _slices(sampler, step, dp)
        union = np.concatenate(slices)
        assert np.array_equal(union, sampler.global_indices(step * G, G))
        assert len(set(union.tolist())) == len(union), "slices overlap"


@pytest.mark.parametrize("n_sequences", [1, 2, 3, 64, 1000, 4097])
def test_an_epoch_visits_every_sequence_once(n_sequences):
    sampler = BatchSampler(sequences_in(16 * n_sequences + 1, 16), seed=1)
    seen = sampler.global_indices(0, n_sequences)
    assert sorted(seen.tolist()) == list(range(n_sequences))
    if n_sequences >= 64:  # shuffled, and differently in the next epoch
        assert not np.array_equal(seen, np.arange(n_sequences))
        assert not np.array_equal(sampler.global_indices(n_sequences, n_sequences), seen)


def test_the_shuffle_needs_no_memory_that_grows_with_the_data():
    """A trillion sequences: the batch at any position comes at once, distinct and in range (a
    permutation array would need 8 TB)."""
    sampler = BatchSampler(sequences_in(16 * 10**12 + 1, 16), seed=5)
    batch = sampler.global_indices(987_654_321_000, 4096)
    assert len(set(batch.tolist())) == 4096 and 0 <= batch.min() and batch.max() < 10**12


def test_resume_continues_at_samples_consumed_even_with_another_global_batch():
    """The state is the number of samples consumed: a restarted sampler gives the same batches, and
    a run that ramps its global batch from 8 to 16 reads exactly the samples an unchanged run reads,
    with none repeated or skipped. Other seeds give other batches."""
    used = BatchSampler(sequences_in(5000, 16), seed=9)
    for step in range(5):
        used.global_indices(step * G, G)
    fresh = BatchSampler(sequences_in(5000, 16), seed=9)
    other_seed = BatchSampler(sequences_in(5000, 16), seed=10)
    for step in range(5, 12):
        for r in range(2):
            assert np.array_equal(used.rank_indices(step * G, G, r, 2), fresh.rank_indices(step * G, G, r, 2))
        assert not np.array_equal(fresh.global_indices(step * G, G), other_seed.global_indices(step * G, G))
    ramped = [fresh.global_indices(s * 8, 8) for s in range(3)]  # 3 steps of 8, then 16 from sample 24
    ramped += [fresh.global_indices(24 + s * 16, 16) for s in range(2)]
    assert np.array_equal(np.concatenate(ramped), fresh.global_indices(0, 56))


def test_micro_batches_are_shifted_targets():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = micro_batches(TokenWindows(tokens, block_size=8), np.array([0, 3, 5, 7]), micro_batch=2)
    assert len(batches) == 2
    x, y = batches[0].tokens, batches[0].targets
    assert (
        x.shape == (2, 8)
        and np.array_equal(x[1], np.arange(24, 32))
        and np.array_equal(y[1], np.arange(25, 33))
    )


@pytest.mark.mpi(ranks=4, timeout=60)
def test_dynamic_map_runs_every_task_exactly_once(comm):
    from hpcllm.parallel.tasks import dynamic_map, largest_first

    sizes = [1, 50, 3, 3, 20, 7, 1, 1, 9, 2, 4, 30]
    mine = [
        task
        for task, result in dynamic_map(comm, largest_first(sizes), lambda t: t * t)
        if result == task * task
    ]
    everyone = sorted(t for part in comm.allgather(mine) for t in part)
    assert everyone == list(range(len(sizes)))


def test_byte_ranges_hold_every_record_once_whatever_the_chunk(tmp_path):
    from collections import Counter

    from hpcllm.data import corpus

    path = tmp_path / "a.jsonl"
    texts = [f"doc {i} " + "x" * (i % 37) for i in range(300)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    for chunk in (1, 7, 64, 333, 1000, 10**9):
        got = []
        for piece in corpus.pieces([path], chunk):
            got += [text for _, text in corpus.read_piece(path, piece, "text", corpus.Documents(Counter()))]
        assert got == texts, chunk
