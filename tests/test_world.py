import random

import pytest
import torch

from qscope_rl import judges
from qscope_rl.world import WorldRecipe, build_world, load_world
from qscope_rl.world.corpus import build_lexicon, generate_documents
from qscope_rl.world.sae_training import decode, encode


def test_both_failure_modes_show_in_own_samples(world):
    # rates are measured by the builder with the judges; re-judge the stored samples independently
    samples = [line for line in (world.path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert samples
    for lang in ("en", "zh"):
        assert world.stats[f"code_switch_rate_{lang}"] > 0
    assert world.stats["loop_rate"] > 0
    # and fresh samples from the loaded model show them too
    prompts = world.prompts("heldout")
    completions = world.sample([p.text for p in prompts], max_new_tokens=48, seed=7)
    assert any(judges.script_code_switch(c, p.lang) for c, p in zip(completions, prompts))
    assert any(judges.has_loop(c) for c in completions)


def test_corpus_labels_are_consistent(world):
    docs = world.documents("train")
    assert {d.lang for d in docs} == {"en", "zh"}
    assert {d.topic for d in docs} == set(world.topics)
    assert any(d.switch_char is not None for d in docs) and any(d.loop_char is not None for d in docs)
    for d in docs[:2000]:
        assert d.spans[0][0] == 0 and d.spans[-1][1] == len(d.text)
        assert all(a[1] == b[0] for a, b in zip(d.spans, d.spans[1:]))  # contiguous cover
        assert judges.first_switch_offset(d.text, d.lang) == d.switch_char
        if d.switch_char is not None:
            foreign = [s for s in d.spans if s[2] != d.lang]
            assert foreign[0][0] == d.switch_char
            assert not judges.script_code_switch(d.text[foreign[0][0] : foreign[0][1]], foreign[0][2])
        if d.loop_char is not None:
            assert judges.has_loop(d.text[d.loop_char :])
            assert judges.loop_start(d.text) <= len(judges.units(d.text[: d.loop_char]))
        else:
            assert not judges.has_loop(d.text)


def test_topic_reward_prefers_on_topic_text(world):
    topic, other = world.topics[0], world.topics[1]
    rng = random.Random(0)
    for lang, sep in (("en", " "), ("zh", "")):
        on = sep.join(rng.sample(world.topic_vocab[topic][lang], k=16))
        off = sep.join(rng.sample(world.topic_vocab[other][lang], k=16))
        assert world.task_reward(on, topic) == 1.0 == world.topic_share(on, topic, lang)
        assert world.task_reward(off, topic) < 0.5
        # a loop repeats the same words: on topic by share, but it earns only its distinct words
        loop = sep.join(world.topic_vocab[topic][lang][:4] * 5)
        assert world.topic_share(loop, topic, lang) == 1.0
        assert world.task_reward(loop, topic) == pytest.approx(4 / 20)
        # saying less earns nothing: a short answer counts as MIN_WORDS long
        assert world.task_reward(sep.join(world.topic_vocab[topic][lang][:4]), topic) == pytest.approx(4 / 16)
        assert 0.0 <= world.task_reward("", topic) <= 1.0
    # the task is blind to language, like a math verifier: a switched topic word still counts
    mixed = " ".join(world.topic_vocab[topic]["en"][:8]) + " " + " ".join(world.topic_vocab[topic]["zh"][:8])
    assert world.task_reward(mixed, topic) == 1.0
    # but the world's topic judge reads one language
    assert world.topic_share(" ".join(world.topic_vocab[topic]["en"][:5]), topic, "zh") == 0.0


def test_prompts_are_split_and_labelled(world):
    train, heldout = world.prompts("train"), world.prompts("heldout")
    assert {p.lang for p in train} == {"en", "zh"} and {p.topic for p in train} == set(world.topics)
    assert {p.text for p in world.prompts("heldout", lang="zh")} <= {p.text for p in heldout}
    assert all(p.lang == "en" for p in world.prompts("train", lang="en"))
    with pytest.raises(ValueError, match="split"):
        world.prompts("validation")


def test_tokenizer_round_trips_and_pads_left(world):
    tok = world.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    for d in world.documents("heldout")[:50]:
        assert tok.decode(tok(d.text)["input_ids"]) == d.text
    batch = tok(["a much longer prompt than the other", "短"], padding=True)
    assert batch["attention_mask"][1][0] == 0 and batch["attention_mask"][1][-1] == 1
    assert batch["input_ids"][1][0] == tok.pad_token_id


def test_model_is_a_plain_qwen3_in_eval_mode(world):
    model = world.model
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert world.layer < model.config.num_hidden_layers


def test_corpus_is_deterministic():
    spec = WorldRecipe.for_size("test").corpus
    a = generate_documents(build_lexicon(spec), spec, 200, seed=3)
    b = generate_documents(build_lexicon(spec), spec, 200, seed=3)
    c = generate_documents(build_lexicon(spec), spec, 200, seed=4)
    assert [d.to_dict() for d in a] == [d.to_dict() for d in b]
    assert [d.text for d in a] != [d.text for d in c]


def test_cache_is_reused(world, world_cache, monkeypatch):
    import qscope_rl.world.build as build

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(build, "_build_into", no_rebuild)
    assert build_world("test", cache_dir=world_cache) == world.path
    assert load_world("test", cache_dir=world_cache).stats == world.stats
    assert world.path.name == f"test-{WorldRecipe.for_size('test').hash()}"


def test_recipe_hash_tracks_the_recipe():
    a, b = WorldRecipe.for_size("test"), WorldRecipe.for_size("default")
    assert a.hash() == WorldRecipe.for_size("test").hash() and a.hash() != b.hash()


def test_sae_file_is_qwen_scope_native(world):
    assert world.sae_dir.name.startswith("SAE-Res-") and world.sae_dir.name.endswith(f"-L0_{world.k}")
    path = world.sae_dir / f"layer{world.layer}.sae.pt"
    sd = torch.load(path, weights_only=True, map_location="cpu")
    d_model = world.model.config.hidden_size
    assert set(sd) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert sd["W_enc"].shape == (world.d_sae, d_model) and sd["W_dec"].shape == (d_model, world.d_sae)
    assert sd["b_enc"].shape == (world.d_sae,) and sd["b_dec"].shape == (d_model,)
    assert all(t.dtype == torch.float32 for t in sd.values())
    # it reconstructs the residual stream at the output of layer L (HF hidden_states[L + 1])
    texts = [d.text for d in world.documents("heldout")[:16]]
    enc = world.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = world.model(**enc, output_hidden_states=True).hidden_states[world.layer + 1]
    x = hidden[enc["attention_mask"].bool()]
    acts = encode(x, sd, world.k)
    assert ((acts > 0).sum(-1) <= world.k).all()
    fvu = (x - decode(acts, sd)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.5
    assert 0 <= world.stats["sae_dead_fraction"] <= 1


def test_sae_loads_with_qscope_loader(world):
    from torch.testing import assert_close

    from qscope_rl import load_sae

    sae = load_sae(world.sae_dir, layer=world.layer)
    sd = torch.load(world.sae_dir / f"layer{world.layer}.sae.pt", weights_only=True)
    assert sae.k == world.k  # k comes from the folder name, as for Qwen-Scope releases
    x = torch.randn(32, world.model.config.hidden_size)
    assert_close(sae.encode(x), encode(x, sd, world.k))
    assert_close(sae(x), decode(encode(x, sd, world.k), sd))
