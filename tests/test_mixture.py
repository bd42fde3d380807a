"""Mixtures of prepared datasets: proportions, layout independence, resume, and bad input."""

import numpy as np
import pytest
import yaml
from conftest import TINY, assert_usage_error, copy_run_at, losses, run_hpcllm, sets

from hpcllm.data.loader import BatchSampler
from hpcllm.data.mixture import MixtureSampler, integer_weights, is_mix, parse_mix
from hpcllm.errors import UsageError


def mixture(weights, sequences=(1000, 37, 500), seed=0):
    samplers = [BatchSampler(n, seed + j) for j, n in enumerate(sequences[: len(weights)])]
    return MixtureSampler(samplers, weights, seed)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.02, 0.98), (1 / 3, 1 / 3, 1 / 3)])
def test_realised_proportions_are_within_one_percent_from_the_first_hundred_samples(weights):
    sampler = mixture(weights)
    counts = sampler.counts(np.arange(0, 20_001))
    assert (np.diff(counts, axis=0) >= 0).all() and (counts.sum(axis=1) == np.arange(0, 20_001)).all()
    shares = counts[100:] / np.arange(100, 20_001)[:, None]
    assert np.abs(shares - np.asarray(weights)).max() <= 0.01
    # The deviation never exceeds a few samples, however long the run.
    assert np.abs(counts - np.arange(0, 20_001)[:, None] * np.asarray(weights)).max() <= len(weights)


def test_every_dataset_is_read_through_its_own_epochs_and_the_layout_does_not_matter():
    sampler = mixture((0.5, 0.3, 0.2))
    whole = sampler.global_indices(0, 4000)
    first = sampler.first
    for j in range(3):  # dataset j's samples are its sampler's, in order: epochs without repeats
        mine = whole[(whole >= first[j]) & (whole < first[j + 1])] - first[j]
        expected = sampler.samplers[j].global_indices(0, len(mine))
        assert np.array_equal(mine, expected)
    for dp in (1, 2, 4):  # the global batch does not depend on how it is split over replicas
        steps = [np.concatenate([sampler.rank_indices(k, 16, r, dp) for r in range(dp)]) for k in (0, 16, 32)]
        assert np.array_equal(np.concatenate(steps), whole[:48])
    assert np.array_equal(sampler.global_indices(1234, 100), whole[1234:1334])  # a resume mid-run


def test_mix_text_is_parsed_and_bad_weights_are_refused():
    assert [c.weight for c in parse_mix("a:3,b:1")] == [0.75, 0.25]
    assert is_mix("a:0.7,b:0.3") and is_mix("a:1") and not is_mix("data/prepared")
    for text, needle in [
        ("a:0,b:1", "must be positive"),
        ("a:-1,b:2", "must be positive"),
        ("a:x", "not DIR:WEIGHT"),
        ("a:1,a:2", "twice"),
    ]:
        with pytest.raises(UsageError, match=needle):
            parse_mix(text)
    assert integer_weights([1e-9, 1 - 1e-9]).min() >= 1  # a tiny weight still draws now and then


def test_a_mixture_run_resumes_bitwise_and_reports_its_proportions(data_dir, tmp_path):
    """Two datasets sharing the byte tokenizer, 0.7/0.3; a resume from the middle checkpoint gives
    the uninterrupted run's losses bitwise. A dataset with another tokenizer is refused."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of the second dataset, with other words" for i in range(400)))
    other = tmp_path / "other"
    assert run_hpcllm(["prepare", corpus, "--tokenizer", "byte", "--out", other]).returncode == 0
    mix = f"{data_dir}:0.7,{other}:0.3"
    full = tmp_path / "full"
    proc = run_hpcllm(
        [
            "train",
            "--data",
            mix,
            "--out",
            full,
            *TINY,
            "--steps",
            8,
            *sets("train.ckpt_every=4", "train.keep=5"),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "mixture over" in x)
    assert "mixture over 64 samples" in line and "(weight 70.0%)" in line and "(weight 30.0%)" in line
    share = float(line.split(f"{data_dir.name} ")[1].split("%")[0]) / 100
    assert abs(share - 0.7) <= 2 / 64, line
    crashed = copy_run_at(full, "step-00000004", tmp_path / "crashed")
    resumed = run_hpcllm(["train", "--out", crashed, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(full), losses(crashed)
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    assert yaml.safe_load((full / "config.yaml").read_text())["data"]["mix"] == mix  # what --resume reads

    bpe = tmp_path / "bpe"
    assert run_hpcllm(["prepare", corpus, "--vocab-size", "300", "--out", bpe]).returncode == 0
    refused = run_hpcllm(["train", "--data", f"{data_dir}:0.5,{bpe}:0.5", "--out", tmp_path / "no", *TINY])
    assert_usage_error(refused, f"{bpe} was prepared with another tokenizer", "--tokenizer")
    refused = run_hpcllm(["train", "--data", f"{data_dir}:0.5,{other}:0", "--out", tmp_path / "no", *TINY])
    assert_usage_error(refused, "weights must be positive")
    assert not (tmp_path / "no").exists()
