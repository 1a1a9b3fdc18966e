"""The completion probe: tail pooling against a naive reference, separation of loops on the test world, errors."""

import random

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.testing import assert_close

from qscope_rl import capture_residual, load_sae
from qscope_rl.features.classifier import ClassifierError, FeatureClassifier
from qscope_rl.features.detection import CompletionActivations, encode_completions
from qscope_rl.features.probe import fit_completion_probe, probe_scores, tail_mean_activations


def test_tail_mean_matches_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    batch, length, k, d_sae = 4, 7, 3, 20
    lengths = [7, 2, 0, 5]  # a full, a short, an empty and a mid-length completion, right-padded
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    values = torch.rand(batch, length, k, generator=g) * mask[..., None]
    indices = torch.randint(0, d_sae, (batch, length, k), generator=g)
    acts = CompletionActivations(values, indices, mask, d_sae=d_sae)
    got = tail_mean_activations(acts, last=3)
    for i, n in enumerate(lengths):
        want = torch.zeros(d_sae)
        for t in range(max(n - 3, 0), n):
            for v, j in zip(values[i, t], indices[i, t]):
                want[j] += v
        assert_close(got[i], want / max(min(n, 3), 1))
    assert float(got[2].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="last must be"):
        tail_mean_activations(acts, last=0)


def completion_acts(world, sae, texts):
    enc = world.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad(), capture_residual(world.model, sae.layer) as cap:
        world.model(**enc)
    return encode_completions(sae, cap.last, enc["attention_mask"].bool())


@pytest.mark.slow
def test_probe_separates_looping_documents_and_round_trips(world, tmp_path):
    sae = load_sae(world.sae_dir, layer=world.layer)
    docs = world.documents("train")
    looping = [d.text for d in docs if d.loop_char is not None]
    clean = [d.text for d in docs if d.loop_char is None]
    rng = random.Random(0)
    rng.shuffle(looping)
    rng.shuffle(clean)
    probe = fit_completion_probe(world.model, world.tokenizer, sae, looping[:150], clean[:150], last=16)
    assert probe.features == "tail_mean:16" and probe.kind == "logistic"
    held_out = looping[150:250] + clean[150:250]
    scores = probe_scores(completion_acts(world, sae, held_out), probe)
    assert scores.shape == (200,)
    assert roc_auc_score([1] * 100 + [0] * 100, scores.tolist()) > 0.9

    path = probe.save(tmp_path / "loop.safetensors")
    loaded = FeatureClassifier.load(path, sae=sae)
    assert loaded.features == "tail_mean:16"
    assert_close(probe_scores(completion_acts(world, sae, held_out[:8]), loaded), scores[:8])
    # a probe is not a max_acts classifier, and a max_acts classifier is not a probe
    with pytest.raises(ClassifierError, match="tail_mean:16"):
        loaded.predict_texts(world.model, world.tokenizer, sae, held_out[:2])
    plain = FeatureClassifier.fit(torch.rand(4, sae.d_sae), ["a", "a", "b", "b"], sae, kind="logistic")
    with pytest.raises(ValueError, match="not a completion probe"):
        probe_scores(completion_acts(world, sae, held_out[:2]), plain)
    from qscope_rl.rewards import SAEProbePenalty

    with pytest.raises(ValueError, match="not a completion probe"):
        SAEProbePenalty(plain)
    # activations of another SAE are refused
    other = CompletionActivations(torch.zeros(1, 2, sae.k), torch.zeros(1, 2, sae.k, dtype=torch.long),
                                  torch.ones(1, 2, dtype=torch.bool), d_sae=sae.d_sae + 1)
    with pytest.raises(ValueError, match="d_sae"):
        probe_scores(other, probe)
    with pytest.raises(ValueError, match="positive texts is empty"):
        fit_completion_probe(world.model, world.tokenizer, sae, [], clean[:4])
    with pytest.raises(ValueError, match="last must be >= 1"):
        fit_completion_probe(world.model, world.tokenizer, sae, looping[:2], clean[:2], last=0)


@pytest.mark.slow
def test_probe_command_fits_checks_and_saves(world, world_cache, tmp_path, capsys, monkeypatch):
    import json

    from qscope_rl.cli import main

    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    out = tmp_path / "loop.safetensors"
    assert main(["features", "probe", "--target", "loop", "--max-texts", "120", "--last", "16", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_fit"] == {"positive": 96, "negative": 96} and result["n_held_out"] == {"positive": 24,
                                                                                           "negative": 24}
    assert result["held_out_auroc"] > 0.9 and result["features"] == "tail_mean:16"
    assert FeatureClassifier.load(out).features == "tail_mean:16"
    with pytest.raises(SystemExit, match="--holdout must be in"):
        main(["features", "probe", "--holdout", "1.5"])
    with pytest.raises(SystemExit, match="needs --sae and --layer"):
        main(["features", "probe", "--model", "some/model"])
