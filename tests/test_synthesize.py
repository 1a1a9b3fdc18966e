"""Synthesis for inactive features: targets, kept candidates really fire, the dataset, bad input."""

import json

import pytest
import torch

from qscope_rl import load_sae
from qscope_rl.cli import main
from qscope_rl.features.feature_pack import Feature, FeaturePack
from qscope_rl.features.text_features import encode_texts
from qscope_rl.hooks import capture_residual
from qscope_rl.tools.synthesize import feature_coverage, synthesize, target_features, top_contexts, unguided


def test_target_features():
    coverage = torch.tensor([0, 3, 0, 0, 1])
    assert target_features(coverage).tolist() == [0, 2, 3]
    assert target_features(coverage, [3, 1, 0]).tolist() == [0, 3]
    assert target_features(coverage, torch.tensor([True, True, False, True, True])).tolist() == [0, 3]
    pack = FeaturePack("p", "contrastive", "m", "s", 0, 5, 4, [Feature(2, "x", 1.0), Feature(4, "y", 0.5)])
    assert target_features(coverage, pack).tolist() == [2]
    with pytest.raises(ValueError, match="out of range"):
        target_features(coverage, [7])
    with pytest.raises(ValueError, match="mask must have shape"):
        target_features(coverage, torch.tensor([True, False]))


def test_skip_tokens_pools_only_the_rest(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    text = world.documents("heldout")[0].text
    ids = world.tokenizer(text, return_tensors="pt")["input_ids"]
    with capture_residual(world.model, world.layer) as cap:
        world.model(input_ids=ids)
    dense = sae.encode(cap.last[0])  # (T, d_sae)
    feats = encode_texts(world.model, world.tokenizer, sae, [text, text], skip_tokens=[0, 5], progress=False)
    torch.testing.assert_close(feats.max_acts[0], dense.max(0).values)
    torch.testing.assert_close(feats.max_acts[1], dense[5:].max(0).values)
    torch.testing.assert_close(feats.mean_hidden[1], cap.last[0, 5:].mean(0))


def test_top_contexts_come_likeliest_hit_first(world):
    """Against a naive reference: every token where the feature fires (dense encode), its context ranked by
    p(token | context) under the model, best per distinct context. English texts: no character is split."""
    sae = load_sae(world.sae_dir, layer=world.layer)
    model, tok = world.model, world.tokenizer
    texts = [d.text for d in world.documents("heldout") if d.lang == "en"][:24]
    max_acts = encode_texts(model, tok, sae, texts, progress=False).max_acts
    features = max_acts.gt(0).sum(0).argsort(descending=True)[40:44].tolist()  # fire in some texts, not all
    got = top_contexts(model, tok, sae, texts, max_acts, features, n=3, context_tokens=8, pool=len(texts))
    assert all(len(got.get(f, [])) == 3 for f in features)  # each fires after several distinct contexts
    for f in features:
        best = {}
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad(), capture_residual(model, world.layer) as cap:
                logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for t in sae.encode(cap.last[0])[:, f].nonzero().flatten().tolist():
                prefix = tok.decode(ids[0, max(t - 8, 0):t])
                if t > 0 and prefix.strip():
                    best[prefix] = max(float(logp[t - 1, ids[0, t]]), best.get(prefix, -float("inf")))
        want = sorted(best, key=best.get, reverse=True)[:3]
        assert got.get(f, []) == want, f
    # Chinese: byte-level tokens split characters; a context never ends (or starts) inside one
    zh = [d.text for d in world.documents("heldout") if d.lang == "zh"][:24]
    zh_acts = encode_texts(model, tok, sae, zh, progress=False).max_acts
    contexts = top_contexts(model, tok, sae, zh, zh_acts, zh_acts.gt(0).any(0).nonzero().flatten().tolist(), n=2)
    assert contexts and all(c.strip() and "\ufffd" not in c for cs in contexts.values() for c in cs)


def test_world_synthesis_keeps_only_real_activations(world, tmp_path):
    sae = load_sae(world.sae_dir, layer=world.layer)
    model, tok = world.model, world.tokenizer
    data = [d.text for d in world.documents("train") if d.lang == "en"][:16]
    reference = [d.text for d in world.documents("heldout") if d.lang == "zh"][:40]
    coverage = feature_coverage(model, tok, sae, data, progress=False)
    assert coverage.shape == (sae.d_sae,) and int(coverage.max()) <= len(data)
    targets = target_features(coverage, feature_coverage(model, tok, sae, reference, progress=False) > 0)[:8]
    assert len(targets) > 0 and (coverage[targets] == 0).all()
    prompts = [p.text for p in world.prompts("train", "en")]
    result = synthesize(model, tok, sae, targets, prompts, reference=reference, per_target=2, max_new_tokens=24)
    assert result.n_generated <= 2 * len(targets)
    assert set(result.covered) <= set(targets.tolist()) and 0 <= result.coverage <= 1
    for row in result.rows:  # every kept text fires its target on a generated token, unsteered
        skip = len(tok(row["prompt"])["input_ids"])
        acts = encode_texts(model, tok, sae, [row["text"]], skip_tokens=[skip], progress=False).max_acts[0]
        assert acts[row["target_feature"]] > 0
        assert row["text"] == row["prompt"] + row["completion"]
    if result.rows:
        path = result.save_jsonl(tmp_path / "synth.jsonl")
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(lines) == len(result.rows) and {"text", "target_feature", "strategy"} <= set(lines[0])
    base = unguided(model, tok, sae, targets, prompts, budget=6, max_new_tokens=24)
    assert base.n_generated == 6 and len(base.dataset()) == 6


def test_bad_input(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    model, tok = world.model, world.tokenizer
    with pytest.raises(ValueError, match="dataset is empty"):
        feature_coverage(model, tok, sae, [])
    with pytest.raises(ValueError, match="no target features"):
        synthesize(model, tok, sae, [], ["a prompt"])
    with pytest.raises(ValueError, match="out of range"):
        synthesize(model, tok, sae, [sae.d_sae + 3], ["a prompt"])
    with pytest.raises(ValueError, match="needs reference texts"):
        synthesize(model, tok, sae, [1], ["a prompt"], strategy="context")
    with pytest.raises(ValueError, match="unknown strategy"):
        synthesize(model, tok, sae, [1], ["a prompt"], strategy="magic")
    with pytest.raises(ValueError, match="target features must be integer ids"):  # not silently feature 1
        synthesize(model, tok, sae, [1.5], ["a prompt"])
    for strength in (float("nan"), float("inf"), 0.0, -2.0):  # it steers toward the target: finite and > 0
        with pytest.raises(ValueError, match="strength must be a finite number > 0"):
            synthesize(model, tok, sae, [1], ["a prompt"], strategy="steer", strength=strength)


def test_cli_synthesize(world, world_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    out = tmp_path / "synth.jsonl"
    data = tmp_path / "data.txt"
    data.write_text("\n".join(d.text for d in world.documents("train")[:8]) + "\n")
    assert main(["synthesize", "--dataset", str(data), "--per-target", "1", "--max-new-tokens", "16",
                 "--unguided", "--out", str(out), "--json", "--plot", str(tmp_path / "s.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["targets"] > 0 and 0 <= summary["coverage"] <= 1 and "unguided_coverage" in summary
    assert (tmp_path / "s.png").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="holds no texts"):
        main(["synthesize", "--dataset", str(empty)])


def test_result_curve_measures():
    from qscope_rl.tools.synthesize import SynthesisResult

    r = SynthesisResult([], targets=list(range(10)), covered=list(range(9)), n_generated=5, curve=[2, 5, 5, 8, 9])
    assert r.samples_to(0.5) == 2 and r.samples_to(0.8) == 4 and r.samples_to(0.9) == 5
    assert r.samples_to(1.0) is None
    assert r.coverage_at(3) == 0.5 and r.coverage_at(100) == 0.9 and r.coverage_at(0) == 0.0


def test_curves_and_random_contexts(world):
    from qscope_rl.tools.synthesize import random_contexts

    sae = load_sae(world.sae_dir, layer=world.layer)
    model, tok = world.model, world.tokenizer
    zh = [d.text for d in world.documents("heldout") if d.lang == "zh"][:20]
    prompts = random_contexts(tok, zh, 12, seed=3)
    assert len(prompts) == 12 and all(any(t.startswith(p) for t in zh) for p in prompts)
    assert all("\ufffd" not in p and p.strip() for p in prompts)
    assert random_contexts(tok, zh, 12, seed=3) == prompts
    data = [d.text for d in world.documents("train") if d.lang == "en"][:16]
    targets = target_features(feature_coverage(model, tok, sae, data, progress=False),
                              feature_coverage(model, tok, sae, zh, progress=False) > 0)[:10]
    guided = synthesize(model, tok, sae, targets, prompts, reference=zh, per_target=2, max_new_tokens=16)
    assert len(guided.curve) == guided.n_generated and guided.curve[-1] == len(guided.covered)
    assert all(a <= b for a, b in zip(guided.curve, guided.curve[1:]))
    base = unguided(model, tok, sae, targets, prompts, budget=40, max_new_tokens=16, batch_size=8, stop_at=0.0)
    assert base.n_generated == 8  # stops after the first batch: 0% is reached at once
    full = unguided(model, tok, sae, targets, prompts, budget=24, max_new_tokens=16, batch_size=8)
    assert len(full.curve) == 24 and full.curve[-1] == len(full.covered)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        unguided(model, tok, sae, targets, prompts, budget=0)
    for share in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"stop_at is a share of the targets, in \[0, 1\]"):
            unguided(model, tok, sae, targets, prompts, budget=8, stop_at=share)


def test_downstream_experiment_pieces(world):
    from qscope_rl.demo.synthesis_experiment import downstream, gain_interval, judged_topic, synthesis_setting

    doc = next(d for d in world.documents("heldout") if d.switch_char is None and d.loop_char is None)
    assert judged_topic(world, doc.text) == doc.topic
    assert judged_topic(world, "") is None
    setting = synthesis_setting(world, n_real=16, tail_share=0.25)
    assert len(setting["real"]) == 16 and sum(d.lang == "zh" for d in setting["real"]) == 4
    assert len(setting["twice_real"]) == 32 and setting["real"] == setting["twice_real"][:16]
    assert not set(setting["reference"]) & {d.text for d in setting["tail_test"]}
    clean_zh = [d for d in world.documents("train") if d.lang == "zh" and d.switch_char is None and d.loop_char is None]
    extra = [d.text for d in clean_zh[:8]]
    result = downstream(world, setting, {"real+same": extra, "real+none": []}, boot=50)
    assert result["real+none"]["f1"] == result["real"]["f1"]  # nothing added: the same model
    assert result["real+same"]["n_train"] == 16 + 8
    # the synthetic texts' judged topics, counted per topic (the documents are labelled, so their own topics)
    expected = {}
    for d in clean_zh[:8]:
        expected[d.topic] = expected.get(d.topic, 0) + 1
    assert result["real+same"]["synthetic_topics"] == expected and result["real+none"]["synthetic_topics"] == {}
    assert "synthetic_topics" not in result["real"]
    assert all(r["ci"][0] <= r["f1"] + 1e-9 or r["ci"][0] <= r["ci"][1] for k, r in result.items() if k[0] != "_")
    gain = gain_interval(result, "real+same", ["real", "real+none"])
    assert gain["ci"][0] <= gain["gain"] <= gain["ci"][1] or gain["ci"][0] == gain["ci"][1]


def test_coverage_curves_plot(tmp_path):
    from qscope_rl.tools.synthesize import SynthesisResult, plot_coverage_curves

    guided = SynthesisResult([], [1, 2, 3, 4], [1, 2, 3, 4], 4, curve=[1, 2, 4, 4])
    base = SynthesisResult([], [1, 2, 3, 4], [1, 2], 8, curve=[0, 1, 1, 1, 2, 2, 2, 2])
    png = plot_coverage_curves({"targeted": guided, "unguided": base}, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="recorded curve"):
        plot_coverage_curves({"none": SynthesisResult([], [1], [], 0)}, tmp_path / "x.png")
