"""Steering for generation: strengths, seeded generation parity, hooks removed, the world's measured effects."""

import json
import math

import pytest
import torch

from qscope_rl import load_sae
from qscope_rl.cli import main
from qscope_rl.demo.measures import steering_metrics, world_topic_pack
from qscope_rl.features.discovery import discover_language_features
from qscope_rl.features.feature_pack import Feature, FeaturePack
from qscope_rl.hooks import decoder_layer
from qscope_rl.tools.steered_generation import (
    PRESETS,
    generate,
    merge_strengths,
    parse_strength,
    perplexity,
    relative_strengths,
    steer,
)


@pytest.fixture(scope="module")
def zh_pack(world, tmp_path_factory):
    """The "Chinese" features, from a small sample of clean documents (the world's own packs use all of them)."""
    sae = load_sae(world.sae_dir, layer=world.layer)
    clean = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    texts = {lang: [d.text for d in clean if d.lang == lang][:150] for lang in ("en", "zh")}
    pack = discover_language_features(world.model, world.tokenizer, sae, texts, top_k=8)["zh"]
    return pack, pack.save(tmp_path_factory.mktemp("packs") / "zh.json")


@pytest.mark.parametrize("text, expected", [
    (-3.5, (-3.5, False)), ("2", (2.0, False)), ("strong", (10.0, True)), ("-medium", (-2.0, True)),
    ("+light", (0.5, True)), ("4x", (4.0, True)), ("-0.5x", (-0.5, True)),
])
def test_parse_strength(text, expected):
    assert parse_strength(text) == expected


def test_bad_strength_is_explained():
    with pytest.raises(ValueError, match="preset light/medium/strong"):
        parse_strength("very strong")
    for bad in (math.nan, "nan", -math.inf, "inf", True):  # a NaN alpha would steer every logit to NaN
        with pytest.raises(ValueError, match="bad steering strength"):
            parse_strength(bad)


def toy_pack():
    feats = [Feature(3, "a", 1.0, {"mean_act_pos": 2.5, "mean_act_neg": 0.5}), Feature(5, "b", 0.5, {})]
    return FeaturePack("toy", "contrastive", "m", "s", 0, 8, 4, feats)


def test_relative_strengths():
    pack = toy_pack()
    assert relative_strengths(pack, "-strong", top=1) == {3: -PRESETS["strong"] * 2.0}
    assert relative_strengths(pack, 1.5) == {3: 1.5, 5: 1.5}  # raw alpha needs no statistics
    with pytest.raises(ValueError, match="no mean_act_pos"):
        relative_strengths(pack, "medium")
    with pytest.raises(ValueError, match=r"features \[7\] are not in feature pack"):
        relative_strengths(pack, "medium", features=[7])
    assert merge_strengths({1: 1.0}, {1: 0.5, 2: -1.0}) == {1: 1.5, 2: -1.0}


def test_generation_parity_and_hooks_removed(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    prompts = [p.text for p in world.prompts("heldout", "en")[:6]]
    kw = dict(max_new_tokens=12, seed=3, progress=False)
    # an edit several times the residual's own norm (measured before the hook census: output_hidden_states
    # makes transformers install its own recorders) changes the samples even on two positions
    with torch.no_grad():
        enc = world.tokenizer(prompts, return_tensors="pt", padding=True)
        hidden = world.model(**enc, output_hidden_states=True).hidden_states[world.layer + 1]
    alpha = 10 * float(hidden[enc["attention_mask"].bool()].norm(dim=-1).mean())
    layer = decoder_layer(world.model, world.layer)
    hooks_before = dict(layer._forward_hooks)  # transformers may hold its own output recorders here
    plain = generate(world.model, world.tokenizer, prompts, **kw)
    assert generate(world.model, world.tokenizer, prompts, **kw) == plain  # seeded
    with steer(world.model, sae, {0: 0.0, 1: 0.0}):  # a zero edit is the identity
        assert generate(world.model, world.tokenizer, prompts, **kw) == plain
    with steer(world.model, sae, {0: alpha}):
        assert generate(world.model, world.tokenizer, prompts, **kw) != plain
    assert dict(layer._forward_hooks) == hooks_before  # ours are gone
    # only the first two positions: edited there by alpha * d_0 at the layer, the rest reached through attention
    from qscope_rl.hooks import capture_residual

    one = world.tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad(), capture_residual(world.model, world.layer) as before:
        logits = world.model(**one).logits
    with torch.no_grad(), steer(world.model, sae, {0: alpha}, positions=slice(0, 2)), \
            capture_residual(world.model, world.layer) as after:
        steered_logits = world.model(**one).logits
    torch.testing.assert_close(after.last[0, :2] - before.last[0, :2], alpha * sae.W_dec[:, 0].expand(2, -1),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(after.last[0, 2:], before.last[0, 2:])
    assert not torch.allclose(steered_logits[0, -1], logits[0, -1])
    assert dict(layer._forward_hooks) == hooks_before
    assert generate(world.model, world.tokenizer, prompts, **kw) == plain
    with pytest.raises(ValueError, match="out of range"):
        steer(world.model, sae, {sae.d_sae: 1.0})
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        generate(world.model, world.tokenizer, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(world.model, world.tokenizer, prompts, batch_size=0)


@pytest.mark.parametrize("features, match", [
    ({3: math.nan}, "strengths must be finite"), ({3: math.inf}, "strengths must be finite"),
    ({3: "strong"}, "strength of feature 3 must be a number"), ({3.5: 1.0}, "feature ids must be integers"),
    ({True: 1.0}, "feature ids must be integers"), ([(3, 1.0, 2.0)], "feature, strength"),
])
def test_steer_refuses_features_it_would_silently_misread(world, features, match):
    sae = load_sae(world.sae_dir, layer=world.layer)
    hooks = dict(decoder_layer(world.model, world.layer)._forward_hooks)
    with pytest.raises(ValueError, match=match):
        steer(world.model, sae, features, mode="clamp")
    assert dict(decoder_layer(world.model, world.layer)._forward_hooks) == hooks


def test_perplexity_matches_the_loss(world):
    tok, model = world.tokenizer, world.model
    prompt, completion = "the cat", " sat on the mat."
    p, c = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    labels = ids.clone()
    labels[0, :len(p)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    assert perplexity(model, tok, [prompt], [completion]) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert math.isnan(perplexity(model, tok, [prompt], [""]))
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        perplexity(model, tok, [prompt], ["a", "b"])


def test_steering_metrics_judge_switches_by_the_lexicon(world):
    """A Spanish switch is invisible to a script judge: the steering measure must count it (the lexicon's truth)."""
    model, tok = world.model, world.tokenizer
    prompt = world.prompts("heldout", "en")[0]
    es = sorted(set(world.lexicon.general["es"]) - world.lexicon.words("en"))[:6]
    zh = sorted(world.lexicon.general["zh"])[:3]
    en_only = set(world.lexicon.general["en"]) - world.lexicon.words("es") - world.lexicon.words("zh")
    clean = " ".join(sorted(en_only)[:6])
    completions = [clean, clean + " " + " ".join(es), clean + " " + "".join(zh), clean]
    m = steering_metrics(world, [prompt] * 4, completions, model, tok)
    assert m["code_switch_rate"] == pytest.approx(2 / 4)
    assert m["code_switch_rate_es"] == pytest.approx(1 / 4)
    assert m["code_switch_rate_zh"] == pytest.approx(1 / 4)
    assert m["code_switch_rate_script"] == pytest.approx(1 / 4)  # what a Unicode-script judge sees
    assert m["n"] == 4


def test_steering_metrics_report_degeneration_beside_perplexity(world):
    """A perplexity ratio below 1 can mean repetition, which the unsteered model finds predictable: the measure
    reports the loop rate, the share of distinct word bigrams (pooled) and the mean completion length beside it."""
    prompt = world.prompts("heldout", "en")[0]
    words = sorted(set(world.lexicon.general["en"]) - world.lexicon.words("es") - world.lexicon.words("zh"))
    fresh = " ".join(words[:7])  # 7 distinct words: 6 distinct bigrams
    loop = " ".join(words[:2] * 4)  # a b a b a b a b: 7 bigrams, 2 distinct, and a trailing loop
    m = steering_metrics(world, [prompt] * 2, [fresh, loop], world.model, world.tokenizer)
    assert m["loop_rate"] == pytest.approx(1 / 2)
    assert m["distinct_2"] == pytest.approx((6 + 2) / (6 + 7))
    assert m["mean_units"] == pytest.approx((7 + 8) / 2)


def test_steering_metrics_refuse_nothing_to_judge_and_unpaired_inputs(world):
    prompt = world.prompts("heldout", "en")[0]
    with pytest.raises(ValueError, match="no completions"):
        steering_metrics(world, [], [], world.model, world.tokenizer)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        steering_metrics(world, [prompt, prompt], ["a"], world.model, world.tokenizer)


@pytest.mark.slow
def test_world_suppression_and_topic_steering(world, zh_pack):
    sae = load_sae(world.sae_dir, layer=world.layer)
    model, tok = world.model, world.tokenizer
    prompts = world.prompts("heldout", "en")[:32]
    texts = [p.text for p in prompts]
    kw = dict(max_new_tokens=32, progress=False)
    base = steering_metrics(world, prompts, generate(model, tok, texts, **kw), model, tok)
    with steer(model, sae, relative_strengths(zh_pack[0], "-medium", top=8)):
        suppressed = steering_metrics(world, prompts, generate(model, tok, texts, **kw), model, tok)
    assert suppressed["code_switch_rate_zh"] <= base["code_switch_rate_zh"]  # the zh pack: switches to zh
    # Topic steering, by its mechanism (as ActAdd measures a steering vector): on prompts of the other topics, the
    # next-token probability of the topic's words rises. Whether samples then read as the topic, and at what
    # fluency cost, depends on the world and the strength (benchmarks/utilities.py measures it on the default
    # world; on one build of this test world "strong" moved the next-token mass 0.04 -> 0.21 while the sampled
    # topic share fell, the samples degenerating).
    topic = world.topics[0]
    others = [p.text for p in world.prompts("heldout") if p.topic != topic][:16]
    first_tokens = set()
    for lang, words in world.topic_vocab[topic].items():
        for word in words:
            ids = tok(word if lang == "zh" else " " + word, add_special_tokens=False)["input_ids"]
            first_tokens.update(ids[:1])
    first_tokens = torch.tensor(sorted(first_tokens))
    enc = tok(others, return_tensors="pt", padding=True)  # left padding: the last position is each prompt's

    def topic_mass():
        with torch.no_grad():
            logits = model(**enc).logits[:, -1].float()
        return torch.softmax(logits, -1)[:, first_tokens].sum(-1).mean().item()

    before = topic_mass()
    with steer(model, sae, relative_strengths(world_topic_pack(world, sae, topic, n_texts=80), "strong", top=8)):
        after = topic_mass()
    assert after > before


def test_cli_steer(world, world_cache, zh_pack, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QSCOPE_RL_CACHE", str(world_cache))
    png = tmp_path / "sweep.png"
    assert main(["steer", "--pack", str(zh_pack[1]), "--sweep=-light,-medium", "-n", "4", "--max-new-tokens", "8",
                 "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["runs"]) == {"unsteered", "-light", "-medium"}
    assert all(len(r["completions"]) == 4 and "code_switch_rate" in r["metrics"] for r in out["runs"].values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["steer", "--feature", "3=-2.5", "--prompt", "the", "--max-new-tokens", "4"]) == 0
    with pytest.raises(SystemExit, match="relative strength needs --pack"):
        main(["steer", "--feature", "3=strong", "--prompt", "the"])
    with pytest.raises(SystemExit, match="out of range"):
        main(["steer", "--feature", "99999=1", "--prompt", "the"])


def unedited_residual(world, n: int = 3):
    """(SAE, tokenized held-out documents, the unedited residual at the SAE's layer on them)."""
    from qscope_rl.hooks import capture_residual

    sae = load_sae(world.sae_dir, layer=world.layer)
    ids = world.tokenizer([d.text for d in world.documents("heldout")[:n]], return_tensors="pt", padding=True)
    with torch.no_grad(), capture_residual(world.model, world.layer) as plain:
        world.model(**ids)
    return sae, ids, plain.last


def test_conditional_steering_matches_a_reference_and_leaves_silent_positions_alone(world):
    """h' = h + (m - 1) * a_j(h) * d_j from a dense encode of the unedited residual; zero where j is silent."""
    from qscope_rl.hooks import capture_residual

    sae, ids, h = unedited_residual(world)
    acts = sae.encode(h)
    fired = (acts > 0).float().mean((0, 1))
    features = fired.argsort(descending=True)[3:6].tolist()  # fire on some positions, not all
    factors = {features[0]: 0.0, features[1]: 2.0, features[2]: 0.5}
    want = h.clone()
    for f, m in factors.items():
        want += (m - 1) * acts[..., f:f + 1] * sae.W_dec[:, f]
    with torch.no_grad(), steer(world.model, sae, factors, mode="conditional"), \
            capture_residual(world.model, world.layer) as edited:
        world.model(**ids)
    torch.testing.assert_close(edited.last, want, atol=1e-4, rtol=1e-4)
    silent = (acts[..., features] == 0).all(-1)
    assert silent.any() and (~silent).any()
    torch.testing.assert_close(edited.last[silent], h[silent])  # untouched where none of them fires
    with pytest.raises(ValueError, match="factors must be >= 0"):
        steer(world.model, sae, {features[0]: -1.0}, mode="conditional")
    with pytest.raises(ValueError, match="unknown steering mode"):
        steer(world.model, sae, {features[0]: 1.0}, mode="multiply")


def test_steering_protocol_choice():
    from qscope_rl.demo.steering_experiment import choose

    options = {"a": (0.95, 2.0), "b": (0.80, 1.2), "c": (0.60, 1.0)}
    assert choose(options, 1.5) == "b"  # the largest effect within the perplexity cap
    assert choose(options, 0.5) == "c"  # none within: the smallest perplexity ratio


def test_pre_clamp_caps_the_pre_activation_and_leaves_the_rest_alone(world):
    """h' = h - ReLU(pre_j(h) - v) / (e_j . d_j) * d_j: after the edit pre_j <= v; below v nothing changes."""
    from qscope_rl.hooks import capture_residual

    sae, ids, h = unedited_residual(world)
    pre = sae.pre_acts(h)
    feature = int((pre > 0).float().mean((0, 1)).argsort(descending=True)[5])  # above 0 on some positions only
    cap = -0.5
    with torch.no_grad(), steer(world.model, sae, {feature: cap}, mode="pre_clamp"), \
            capture_residual(world.model, world.layer) as edited:
        world.model(**ids)
    after = sae.pre_acts(edited.last)[..., feature]
    below = pre[..., feature] <= cap
    assert below.any() and (~below).any()
    assert float(after.max()) <= cap + 1e-4
    torch.testing.assert_close(after[~below], torch.full_like(after[~below], cap), atol=1e-4, rtol=0)
    torch.testing.assert_close(edited.last[below], h[below])
    col = sae.W_dec[:, feature]
    step = edited.last - h  # only along the feature's decoder column
    torch.testing.assert_close(step - (step @ col)[..., None] * col / col.dot(col), torch.zeros_like(step),
                               atol=1e-4, rtol=0)


def test_grouped_steering_edits_each_groups_rows_with_its_own_features(world):
    """The topic experiment's batching: one row-restricted hook per group, stacked, in one forward."""
    import contextlib

    from qscope_rl.demo.steering_experiment import run_groups
    from qscope_rl.hooks import capture_residual

    sae = load_sae(world.sae_dir, layer=world.layer)
    # transformers may keep its own output-recording hooks on a layer once hidden states were asked for
    hooks_before = dict(decoder_layer(world.model, world.layer)._forward_hooks)
    ids = world.tokenizer([d.text for d in world.documents("heldout")[:4]], return_tensors="pt", padding=True)
    with torch.no_grad(), capture_residual(world.model, world.layer) as plain:
        world.model(**ids)
    groups = {(0, 1): {3: 5.0}, (2, 3): {7: -5.0}}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for rows, alphas in groups.items():
            stack.enter_context(steer(world.model, sae, alphas, rows=rows))
        with capture_residual(world.model, world.layer) as edited:
            world.model(**ids)
    for rows, alphas in groups.items():
        (f, a), = alphas.items()
        torch.testing.assert_close(edited.last[list(rows)], plain.last[list(rows)] + a * sae.W_dec[:, f],
                                   atol=1e-4, rtol=1e-4)
    prompts = world.prompts("heldout", "en")[:6]
    runs = run_groups(world, sae, [(prompts[:3], {3: 5.0}, None), (prompts[3:], None, world.topics[0])], "add",
                       max_new_tokens=4)
    assert "topic_share" not in runs[0] and "topic_share" in runs[1]  # each group judged on its own target
    assert runs[0]["n"] == 3 and runs[1]["n"] == 3 and {"code_switch_rate", "perplexity"} <= set(runs[0])
    assert dict(decoder_layer(world.model, world.layer)._forward_hooks) == hooks_before  # every hook of ours removed


def test_generate_min_new_tokens(world):
    prompts = [p.text for p in world.prompts("heldout", "en")[:4]]
    fixed = generate(world.model, world.tokenizer, prompts, max_new_tokens=6, min_new_tokens=6, progress=False)
    assert len(fixed) == 4 and all(c for c in fixed)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(world.model, world.tokenizer, prompts, max_new_tokens=4, min_new_tokens=5)


def test_the_dense_diffmean_arm_edits_its_rows_with_the_world_vector(world):
    """The experiments' DiffMean arm: a world vector (topic docs minus the others', at the SAE's layer), added to
    the chosen rows only by ``steering``, the same context every arm goes through; no hook left behind."""
    from qscope_rl.demo.measures import clean_documents, world_topic_vector
    from qscope_rl.demo.steering_experiment import run_groups, steering
    from qscope_rl.hooks import capture_residual
    from qscope_rl.tools.steering_vectors import diff_mean

    sae = load_sae(world.sae_dir, layer=world.layer)
    topic = world.topics[1]
    vector = world_topic_vector(world, world.layer, topic, n_texts=20)
    docs = clean_documents(world)
    pos = [d.text for d in docs if d.topic == topic]
    assert len(pos) >= 20 and vector.shape == (world.model.config.hidden_size,)
    # the sampled documents are the topic's and the others': the vector points from the others' mean to the topic's
    full = diff_mean(world.model, world.tokenizer, pos, [d.text for d in docs if d.topic != topic], world.layer)
    assert torch.nn.functional.cosine_similarity(vector, full, dim=0) > 0.8
    hooks_before = dict(decoder_layer(world.model, world.layer)._forward_hooks)
    ids = world.tokenizer([d.text for d in world.documents("heldout")[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        with capture_residual(world.model, world.layer) as plain:
            world.model(**ids)
        with steering(world.model, sae, 2.0 * vector, "diffmean", rows=[0, 2]), \
                capture_residual(world.model, world.layer) as edited:
            world.model(**ids)
    torch.testing.assert_close(edited.last[[0, 2]], plain.last[[0, 2]] + 2.0 * vector, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edited.last[[1, 3]], plain.last[[1, 3]])
    prompts = world.prompts("heldout", "en")[:4]
    runs = run_groups(world, sae, [(prompts[:2], 2.0 * vector, topic), (prompts[2:], None, topic)], "diffmean",
                       max_new_tokens=4)
    assert [r["n"] for r in runs] == [2, 2]
    assert dict(decoder_layer(world.model, world.layer)._forward_hooks) == hooks_before
    with pytest.raises(ValueError, match="unknown steering mode"):
        steering(world.model, sae, {3: 1.0}, "dense")


def test_the_headline_is_chosen_among_the_sae_modes_only():
    from qscope_rl.demo.steering_experiment import DENSE, choose, sae_modes

    rows = {"add": (0.3, 1.2), "clamp": (0.5, 1.4), DENSE: (0.9, 1.1)}
    assert choose(rows, 1.5) == DENSE  # the dense arm would win on effect
    assert choose(sae_modes(rows), 1.5) == "clamp"
    assert choose(sae_modes(rows), 1.3) == "add"


def test_the_cut_interval_resamples_prompts_with_all_their_samples():
    """Samples are prompts repeated ``samples`` times (sample j is prompt j % n): the interval resamples prompts."""
    from qscope_rl.demo.steering_experiment import cut_interval

    n, samples = 10, 8
    base = [j % n == 0 for j in range(n * samples)]  # prompt 0 switches in all 8 of its samples, no other prompt
    steered = [j % n == 0 and j < 4 * n for j in range(n * samples)]  # prompt 0 in 4 of them
    assert cut_interval(base, steered, samples) == pytest.approx((0.5, 0.5, 0.5))  # every draw holding prompt 0
    cut, lo, hi = cut_interval(base, base, samples)
    assert cut == 0 and lo == hi == 0
    spread = [j % n < 5 for j in range(n * samples)]  # five prompts switch always; steering removes one of them
    cut, lo, hi = cut_interval(spread, [j % n < 4 for j in range(n * samples)], samples)
    assert cut == pytest.approx(0.2) and 0 <= lo < 0.2 < hi <= 1
    with pytest.raises(ValueError, match="samples"):
        cut_interval(base, steered[:-1], samples)


def test_the_dense_arm_steers_at_any_layer_and_the_sae_arms_only_at_theirs(world):
    from qscope_rl.demo.steering_experiment import DENSE, steering
    from qscope_rl.hooks import capture_residual, decoder_layers

    sae = load_sae(world.sae_dir, layer=world.layer)
    other = (world.layer + 1) % len(decoder_layers(world.model))
    vector = torch.ones(world.model.config.hidden_size)
    ids = world.tokenizer([d.text for d in world.documents("heldout")[:2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        with capture_residual(world.model, other) as plain:
            world.model(**ids)
        with steering(world.model, sae, 0.5 * vector, DENSE, layer=other), \
                capture_residual(world.model, other) as edited:
            world.model(**ids)
    torch.testing.assert_close(edited.last, plain.last + 0.5 * vector)
    with pytest.raises(ValueError, match=f"SAE's layer {world.layer}, not at layer {other}"):
        steering(world.model, sae, {3: 1.0}, "add", layer=other)
