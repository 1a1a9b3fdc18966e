"""Few-shot classification: the Qwen-Scope rule on known features, save / load, the world, bad input."""

import json
import random

import pytest
import torch

from qscope_rl import SparseAutoencoder, load_sae
from qscope_rl.cli import main
from qscope_rl.features.text_features import encode_texts
from qscope_rl.tools.classify import ClassifierError, FeatureClassifier, few_shot_curve, fit_classifier, macro_f1

D_SAE = 12


def toy_sae(seed=0, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_sae, 4, generator=g), "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(4, d_sae, generator=g), "b_dec": torch.zeros(4)}
    return SparseAutoencoder.from_weights(weights, architecture="topk", k=2, layer=0, source=f"toy-{seed}")


def toy_data(n=40, seed=0):
    """Class "a" fires feature 3, class "b" fires feature 7; feature 0 fires on everything (noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    x = torch.zeros(n, D_SAE)
    x[:, 0] = 1.0
    for i, y in enumerate(labels):
        x[i, 3 if y == "a" else 7] = 0.5 + torch.rand(1, generator=g).item()
    return x, labels


def test_rule_finds_the_class_features():
    x, labels = toy_data()
    clf = FeatureClassifier.fit(x, labels, toy_sae())
    assert clf.rules() == {"a": [(3, 1.0)], "b": [(7, 1.0)]}  # K=1 is enough: smallest K wins ties
    assert clf.predict(x) == labels
    assert clf.rule_fires(x).tolist() == [[y == "a", y == "b"] for y in labels]


def test_logistic_and_save_load_roundtrip(tmp_path):
    x, labels = toy_data()
    sae = toy_sae()
    for kind in ("rule", "logistic"):
        clf = FeatureClassifier.fit(x, labels, sae, kind)
        path = clf.save(tmp_path / f"{kind}.safetensors")
        again = FeatureClassifier.load(path, sae=sae)
        assert again.kind == kind and again.classes == ["a", "b"]
        torch.testing.assert_close(again.decision(x), clf.decision(x))
        assert again.predict(x) == labels
    assert b"pickle" not in path.read_bytes()[:64]


def test_loading_against_another_sae_is_a_clear_error(tmp_path):
    x, labels = toy_data()
    path = FeatureClassifier.fit(x, labels, toy_sae(0)).save(tmp_path / "c.safetensors")
    with pytest.raises(ClassifierError, match="fitted on another SAE.*fingerprint"):
        FeatureClassifier.load(path, sae=toy_sae(1))
    with pytest.raises(ClassifierError, match="d_sae 12 != 16"):
        FeatureClassifier.load(path, sae=toy_sae(0, d_sae=16))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file"])
def test_corrupt_or_missing_files(tmp_path, content):
    with pytest.raises(ClassifierError, match="does not exist"):
        FeatureClassifier.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ClassifierError, match="not a safetensors classifier"):
        FeatureClassifier.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("labels, match", [(["a"] * 40, "at least two classes"), (["a", "b"], "one label per text")])
def test_bad_fits(labels, match):
    x, _ = toy_data()
    with pytest.raises(ValueError, match=match):
        FeatureClassifier.fit(x, labels, toy_sae())
    with pytest.raises(ValueError, match="unknown classifier kind"):
        FeatureClassifier.fit(x, _, toy_sae(), kind="svm")


def test_macro_f1():
    assert macro_f1(["a", "b", "b"], ["a", "b", "b"]) == 1.0
    assert macro_f1(["a", "b"], ["b", "b"]) == pytest.approx((0 + 2 / 3) / 2)


def test_world_topics(world, tmp_path):
    sae = load_sae(world.sae_dir, layer=world.layer)
    rng = random.Random(0)
    # one language: a topic is a vocabulary per language, and 8 examples over three languages are 2-3 per language
    docs = [d for d in world.documents("train") if d.lang == "en"]
    topics = world.topics[:3]
    pool = [d for t in topics for d in rng.sample([d for d in docs if d.topic == t], 8)]
    test = [d for d in world.documents("heldout") if d.topic in topics and d.lang == "en"][:60]
    with pytest.raises(ValueError, match="empty"):
        fit_classifier(world.model, world.tokenizer, sae, [], [])
    clf = fit_classifier(world.model, world.tokenizer, sae, [d.text for d in pool], [d.topic for d in pool],
                         progress=False)
    pred = clf.predict_texts(world.model, world.tokenizer, sae, [d.text for d in test], progress=False)
    assert set(pred) <= set(topics)
    chance = 1 / len(topics)
    assert macro_f1([d.topic for d in test], pred, topics) > chance
    ftrain = encode_texts(world.model, world.tokenizer, sae, [d.text for d in pool], progress=False)
    ftest = encode_texts(world.model, world.tokenizer, sae, [d.text for d in test], progress=False)
    curve = few_shot_curve(sae, ftrain, [d.text for d in pool], [d.topic for d in pool], ftest,
                           [d.text for d in test], [d.topic for d in test], seeds_per_class=(2, 8), repeats=1)
    assert set(curve) == {"sae_rule", "sae_rule_seed_threshold", "sae_rule_cv", "sae_logistic", "dense_probe",
                          "tfidf_logistic"}
    assert all(0 <= f <= 1 for per_n in curve.values() for f in per_n.values())
    with pytest.raises(ValueError, match="not enough training texts"):
        few_shot_curve(sae, ftrain, [d.text for d in pool], [d.topic for d in pool], ftest,
                       [d.text for d in test], [d.topic for d in test], seeds_per_class=(9,), repeats=1)


def test_cli_fit_predict(world, world_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    seeds = tmp_path / "seeds.jsonl"
    docs = world.documents("train")
    chosen = [d for t in world.topics[:2] for d in [d for d in docs if d.topic == t][:6]]
    seeds.write_text("".join(json.dumps({"text": d.text, "label": d.topic}) + "\n" for d in chosen))
    clf = tmp_path / "clf.safetensors"
    assert main(["classify", "fit", "--texts", str(seeds), "--classifier", str(clf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == sorted(world.topics[:2])
    cut = tmp_path / "cut.safetensors"
    assert main(["classify", "fit", "--texts", str(seeds), "--classifier", str(cut), "--threshold", "seed"]) == 0
    assert any(k.startswith("thresholds_") for k in FeatureClassifier.load(cut).tensors)
    capsys.readouterr()
    new = tmp_path / "new.txt"
    new.write_text("\n".join(d.text for d in world.documents("heldout")[:5]) + "\n")
    assert main(["classify", "predict", "--classifier", str(clf), "--texts", str(new), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    FeatureClassifier.fit(*toy_data(), toy_sae()).save(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit, match="another SAE"):
        main(["classify", "predict", "--classifier", str(tmp_path / "other.safetensors"), "--texts", str(new)])


def brute_force_cuts(x, pos):
    """Per feature: try every cut strictly between consecutive distinct values (and 0); best gain wins."""
    cuts = []
    for f in range(x.shape[1]):
        col = x[:, f]
        best, best_cut = ((col[pos] > 0).float().mean() - (col[~pos] > 0).float().mean()).item(), 0.0
        values = sorted(set(col.tolist()) | {0.0}, reverse=True)
        for hi, lo in zip(values, values[1:]):
            if hi <= 0:
                continue
            cut = (hi + lo) / 2
            gain = ((col[pos] > cut).float().mean() - (col[~pos] > cut).float().mean()).item()
            if gain > best + 1e-12:
                best, best_cut = gain, cut
        cuts.append(best_cut)
    return torch.tensor(cuts)


def test_seed_thresholds_match_brute_force():
    from qscope_rl.features.classifier import seed_thresholds

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 6, generator=g) * 3 - 1).clamp(min=0)  # many exact zeros, like max_acts
    pos = torch.rand(30, generator=g) > 0.5
    x[pos, 2] += 1.5  # a feature that fires on both classes, harder on the positives
    torch.testing.assert_close(seed_thresholds(x, pos), brute_force_cuts(x, pos))


def test_seed_threshold_rule_ignores_weak_firing():
    """Feature 1 fires weakly on every text and strongly on class "a" only: "> 0" cannot use it, a cut can."""
    n = 40
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    x = torch.zeros(n, D_SAE)
    x[:, 1] = torch.tensor([2.0 if y == "a" else 0.2 for y in labels])
    sae = toy_sae()
    assert FeatureClassifier.fit(x, labels, sae).predict(x) != labels  # the report's rule: everything fires
    clf = FeatureClassifier.fit(x, labels, sae, threshold="seed")
    assert clf.predict(x) == labels
    assert float(clf.tensors["thresholds_0"][0]) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="unknown rule threshold"):
        FeatureClassifier.fit(x, labels, sae, threshold="median")


def test_seed_threshold_rule_roundtrip(tmp_path):
    n = 40
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    x = torch.zeros(n, D_SAE)
    x[:, 1] = torch.tensor([2.0 if y == "a" else 0.2 for y in labels])
    sae = toy_sae()
    clf = FeatureClassifier.fit(x, labels, sae, threshold="seed")
    again = FeatureClassifier.load(clf.save(tmp_path / "cut.safetensors"), sae=sae)
    assert again.predict(x) == labels


def test_world_tasks_and_share_curve(world):
    from qscope_rl.demo.classify_tasks import TASKS, task_label, world_task
    from qscope_rl.tools.classify import discovery_share_curve

    sae = load_sae(world.sae_dir, layer=world.layer)
    for task in TASKS:
        pool, test = world_task(world, task, pool_per_class=6, test_per_class=5)
        labels = [task_label(task, d) for d in pool]
        assert len(set(labels)) >= 2 and all(labels.count(c) == 6 for c in set(labels))
        assert not {d.text for d in pool} & {d.text for d in test}
    assert {task_label("switch", d) for d in world.documents("heldout")} == {"yes", "no"}
    with pytest.raises(ValueError, match="unknown classification task"):
        task_label("sentiment", world.documents("heldout")[0])
    pool, test = world_task(world, "language", pool_per_class=10, test_per_class=10)
    ftrain = encode_texts(world.model, world.tokenizer, sae, [d.text for d in pool], progress=False)
    ftest = encode_texts(world.model, world.tokenizer, sae, [d.text for d in test], progress=False)
    curve = discovery_share_curve(sae, ftrain, [d.text for d in pool], [d.lang for d in pool], ftest,
                                  [d.text for d in test], [d.lang for d in test], shares=(0.1, 1.0), repeats=2,
                                  methods=("sae_rule", "sae_rule_seed_threshold"))
    assert set(curve) == {"sae_rule", "sae_rule_seed_threshold"}
    assert all(set(v) == {0.1, 1.0} and all(0 <= f <= 1 for f in v.values()) for v in curve.values())
    with pytest.raises(ValueError, match="shares must be in"):
        discovery_share_curve(sae, ftrain, [d.text for d in pool], [d.lang for d in pool], ftest,
                              [d.text for d in test], [d.lang for d in test], shares=(0.0,))


def two_feature_class(n=48):
    """Class "a" fires feature 3 on half its texts and feature 4 on the other half, "b" features 7 / 8 alike (so
    the no-fire fallback cannot rescue K = 1); feature 1 fires weakly on every text."""
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    x = torch.zeros(n, D_SAE)
    x[:, 1] = torch.tensor([0.3 if i % 4 else 0.1 for i in range(n)])
    for i in range(n):
        x[i, {0: 3, 2: 4, 1: 7, 3: 8}[i % 4]] = 1.0
    return x, labels


def test_cv_rule_selection_picks_the_smallest_k_that_generalises():
    from qscope_rl.features.rule_selection import select_rule

    x, labels = two_feature_class()
    clf = select_rule(x, labels, toy_sae(), folds=4, seed=0)
    assert clf.kind == "rule" and clf.predict(x) == labels
    assert clf.selection["top_k"] == 2 and clf.selection["threshold"] == "zero"  # ties: the report's cut
    assert clf.selection["cv_f1"] == pytest.approx(1.0)
    assert {f for f, _ in clf.rules()["a"]} == {3, 4}
    # the grid it chose from: K = 1 misses half of class "a" out of fold, so its cross-validated F1 is lower
    assert clf.selection["grid"][("zero", 1)] < clf.selection["grid"][("zero", 2)]


def test_cv_rule_selection_picks_a_seed_cut_when_zero_cannot_separate():
    from qscope_rl.features.rule_selection import select_rule

    n = 40
    labels = ["a" if i % 2 == 0 else "b" for i in range(n)]
    x = torch.zeros(n, D_SAE)
    x[:, 1] = torch.tensor([2.0 if y == "a" else 0.2 for y in labels])
    clf = select_rule(x, labels, toy_sae(), folds=4)
    assert clf.selection["threshold"] == "seed" and clf.predict(x) == labels


def test_cv_rule_selection_errors():
    from qscope_rl.features.rule_selection import select_rule

    x, labels = two_feature_class(n=8)  # 4 texts per class
    with pytest.raises(ValueError, match="folds"):
        select_rule(x, labels, toy_sae(), folds=5)
    with pytest.raises(ValueError, match="folds"):
        select_rule(x, labels, toy_sae(), folds=1)


def test_few_shot_curve_has_the_cv_rule():
    x, labels = two_feature_class()
    sae = toy_sae()
    feats = type("F", (), {"max_acts": x, "mean_hidden": torch.randn(len(x), 4)})()
    curve = few_shot_curve(sae, feats, ["t"] * len(x), labels, feats, ["t"] * len(x), labels,
                           seeds_per_class=(8,), repeats=2, methods=("sae_rule", "sae_rule_cv"))
    assert curve["sae_rule_cv"][8] == pytest.approx(1.0)
