"""Feature discovery: statistics against a dense reference, loops, bad input, and the demo world."""

import pytest
import torch
from sklearn.metrics import roc_auc_score
from tiny_models import D_SAE, EN, HIDDEN, LAYER, ZH, K, random_sae, tiny_model
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder, capture_residual, load_sae
from qscope_rl.features.detection import encode_completions
from qscope_rl.features.discovery import (
    discover_contrastive_features,
    discover_language_features,
    discover_repetition_features,
    make_loops,
)


class CharTokenizer:
    """One token per character (ids 1..63), no special tokens; pad 0."""

    pad_token_id = eos_token_id = 0

    def __call__(self, texts, truncation=True, max_length=512):
        return {"input_ids": [[ord(c) % 63 + 1 for c in t][:max_length] for t in texts]}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen3"), CharTokenizer(), random_sae()


def dense_reference(model, tok, sae, texts):
    """Dense activations and pre-activations of every token of every text, one text at a time."""
    acts, pres = [], []
    for ids in tok(texts)["input_ids"]:
        with torch.no_grad(), capture_residual(model, LAYER) as cap:
            model(input_ids=torch.tensor([ids]))
        acts.append(sae.encode(cap.last[0]))
        pres.append(sae.pre_acts(cap.last[0]))
    return acts, pres


def test_language_statistics_match_a_dense_reference(tiny):
    model, tok, sae = tiny
    packs = discover_language_features(model, tok, sae, {"en": EN, "zh": ZH}, top_k=5, batch_size=2)
    ref = {lang: dense_reference(model, tok, sae, texts) for lang, texts in (("en", EN), ("zh", ZH))}
    mean = {lang: torch.cat(a).mean(0) for lang, (a, _) in ref.items()}
    score = mean["zh"] - mean["en"]
    zh = packs["zh"]
    expected = score.topk(5).indices
    assert zh.ids.tolist() == expected.tolist() and zh.method == "language" and zh.data["language"] == "zh"
    assert_close(torch.tensor([f.score for f in zh.features]), score[expected], atol=1e-5, rtol=1e-4)
    p_fire = torch.stack([a.amax(0) > 0 for a in ref["zh"][0]]).double().mean(0)
    mean_pre = torch.cat(ref["zh"][1]).mean(0)
    for f in zh.features:
        assert f.stats["p_fire_pos"] == pytest.approx(float(p_fire[f.id]))
        assert f.stats["mean_pre"] == pytest.approx(float(mean_pre[f.id]), abs=1e-4)
        assert f.stats["mean_act_neg"] == pytest.approx(float(mean["en"][f.id]), abs=1e-5)
    assert packs["en"].ids.tolist() == (-score).topk(5).indices.tolist()
    assert zh.data["n_texts"] == {"en": 4, "zh": 3} and (zh.d_sae, zh.d_in, zh.layer) == (D_SAE, HIDDEN, LAYER)


def test_contrastive_p_fire_ranking_matches_reference(tiny):
    model, tok, sae = tiny
    pack = discover_contrastive_features(model, tok, sae, ZH, EN, top_k=8, batch_size=3)
    (pos, _), (neg, _) = dense_reference(model, tok, sae, ZH), dense_reference(model, tok, sae, EN)
    fire = lambda acts: torch.stack([a.amax(0) > 0 for a in acts]).double().mean(0)  # noqa: E731
    diff = fire(pos) - fire(neg)
    assert [f.score for f in pack.features] == pytest.approx(sorted(diff.tolist(), reverse=True)[:len(pack)])
    assert all(f.score > 0 for f in pack.features)
    by_mean = discover_contrastive_features(model, tok, sae, ZH, EN, top_k=3, rank_by="mean_diff")
    mean_diff = torch.cat(pos).mean(0) - torch.cat(neg).mean(0)
    assert by_mean.ids.tolist() == mean_diff.topk(3).indices.tolist()


def test_make_loops_repeats_the_same_tokens():
    seqs = [list(range(10, 30)), list(range(5)), [1, 2]]
    loops = make_loops(seqs, repeats=4, span_tokens=(3, 5), seed=1)
    assert len(loops) >= 2  # [1, 2] is too short for a span of 3
    for loop, first, last in loops:
        span = len(loop) - last
        assert 3 <= span <= 5 and first >= 1
        assert loop[first:first + span] == loop[last:] == loop[last - span:last]
        assert last - first == 3 * span


def test_repetition_discovery_and_forward_stops_at_the_sae_layer(tiny):
    model, tok, sae = tiny
    later = []
    handle = model.model.layers[LAYER + 1].register_forward_hook(lambda *a: later.append(1))
    try:
        pack = discover_repetition_features(model, tok, sae, EN + ZH, top_k=4, batch_size=4)
    finally:
        handle.remove()
    assert later == []  # layers after the SAE's never ran
    assert pack.method == "repetition" and 0 < len(pack) <= 4 and pack.data["n_sequences"] == 7
    assert all(f.stats["mean_act_pos"] > f.stats["mean_act_neg"] for f in pack.features)


def test_bad_input_gets_clear_errors(tiny):
    model, tok, sae = tiny
    with pytest.raises(ValueError, match="language 'fr' has no"):
        discover_language_features(model, tok, sae, {"en": EN, "fr": []})
    with pytest.raises(ValueError, match="language 'zh' has no"):
        discover_language_features(model, tok, sae, {"en": EN, "zh": ["  ", ""]})
    with pytest.raises(ValueError, match="at least two languages"):
        discover_language_features(model, tok, sae, {"en": EN})
    with pytest.raises(ValueError, match="repetition texts has no"):
        discover_repetition_features(model, tok, sae, [])
    with pytest.raises(ValueError, match="to loop"):
        discover_repetition_features(model, tok, sae, ["ab"])
    with pytest.raises(ValueError, match="negative texts has no"):
        discover_contrastive_features(model, tok, sae, EN, [])
    with pytest.raises(ValueError, match="single string"):
        discover_contrastive_features(model, tok, sae, "hello", EN)
    with pytest.raises(ValueError, match="a mapping"):  # a dict would be read as its keys
        discover_contrastive_features(model, tok, sae, {"en": EN}, ZH)
    with pytest.raises(ValueError, match="rank_by"):
        discover_contrastive_features(model, tok, sae, EN, ZH, rank_by="auc")
    with pytest.raises(ValueError, match="layer="):
        discover_contrastive_features(model, tok, SparseAutoencoder(HIDDEN, D_SAE, k=K), EN, ZH)


# -- the demo world ---------------------------------------------------------------------------------


def text_scores(world, sae, packs, texts):
    """Per text: mean over tokens of zh-feature activation minus en-feature activation."""
    enc = world.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), capture_residual(world.model, sae.layer) as cap:
        world.model(**enc)
    acts = encode_completions(sae, cap.last, enc["attention_mask"].bool())
    n = acts.mask.sum(1)
    return ((acts.feature_sum(packs["zh"].ids) - acts.feature_sum(packs["en"].ids)).sum(1) / n).tolist()


def test_world_language_features_separate_heldout_text(world):
    sae = load_sae(world.sae_dir, layer=world.layer)
    train = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    by_lang = {lang: [d.text for d in train if d.lang == lang][:200] for lang in ("en", "zh")}
    packs = discover_language_features(world.model, world.tokenizer, sae, by_lang, top_k=8, batch_size=32)
    for pack in packs.values():
        pack.check_compatible(sae)
        assert len(pack) == 8 and all(f.stats["mean_act_pos"] > f.stats["mean_act_neg"] for f in pack.features)
    held = [d for d in world.documents("heldout") if d.switch_char is None and d.loop_char is None][:120]
    scores = text_scores(world, sae, packs, [d.text for d in held])
    assert roc_auc_score([d.lang == "zh" for d in held], scores) > 0.99


# -- the command line, on a real (tiny, random) HF model folder --------------------------------------


def test_cli_discovers_language_and_contrastive_packs(user_model_and_sae, tmp_path, capsys):
    import argparse
    import json

    from qscope_rl.cli.features import register
    from qscope_rl.features.feature_pack import FeaturePack

    model_dir, sae_dir = user_model_and_sae
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t, "lang": lang}) for lang, texts in
                                                    (("en", EN), ("zh", ZH)) for t in texts))
    (tmp_path / "pos.txt").write_text("\n".join(ZH))
    (tmp_path / "neg.txt").write_text("\n".join(EN))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["--model", str(model_dir), "--sae", str(sae_dir), "--layer", str(LAYER), "--top-k", "4"]
    args = parser.parse_args(["features", "discover", "language", *common, "--texts", str(tmp_path / "texts.jsonl"),
                              "--out", str(tmp_path / "packs")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "language-zh (language)" in out and "mean_pre" in out
    zh = FeaturePack.load(tmp_path / "packs" / "language-zh.json")
    zh.check_compatible(random_sae())
    assert zh.layer == LAYER and 0 < len(zh) <= 4 and zh.data["n_texts"] == {"en": 4, "zh": 3}
    args = parser.parse_args(["features", "discover", "contrastive", *common, "--positive", str(tmp_path / "pos.txt"),
                              "--negative", str(tmp_path / "neg.txt"), "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["contrastive"]["method"] == "contrastive" and printed["contrastive"]["name"] == "contrastive-pos"
    args = parser.parse_args(["features", "discover", "repetition", *common])
    with pytest.raises(SystemExit, match="needs --texts"):
        args.func(args)
