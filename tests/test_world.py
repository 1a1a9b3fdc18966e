import json
import math
import random
import re

import pytest
import torch

from qscope_rl import judges
from qscope_rl.world import WorldRecipe, build_world, load_world
from qscope_rl.world.corpus import ANSWER_MARK, build_lexicon, generate_documents
from qscope_rl.world.sae_training import decode, encode
from qscope_rl.world.task import answer_of


def test_both_failure_modes_show_in_own_samples(world):
    # rates are measured by the builder with the judges; re-judge the stored samples independently
    samples = [json.loads(line) for line in (world.path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["lang"] for s in samples} == {"en", "zh", "es"}
    for lang in ("en", "zh", "es"):
        mine = [s for s in samples if s["lang"] == lang]
        rate = sum(world.code_switch(s["completion"], lang) for s in mine) / len(mine)
        assert rate == pytest.approx(world.stats[f"code_switch_rate_{lang}"]) and rate > 0
    loops = sum(judges.has_loop(s["completion"]) for s in samples) / len(samples)
    assert loops == pytest.approx(world.stats["loop_rate"])
    # and fresh samples from the loaded model show both failures too
    prompts = world.prompts("heldout") * 2
    completions = world.sample([p.text for p in prompts], max_new_tokens=48, seed=7, batch_size=128)
    assert any(world.code_switch(c, p.lang) for c, p in zip(completions, prompts))
    assert any(judges.has_loop(c) for c in completions)


def test_regime_stats_are_recorded(world):
    stats = world.stats
    for key in ("code_switch_rate_en_to_zh", "code_switch_rate_en_to_es", "script_recall_en_to_es",
                "lingua_recall_en_to_es", "lingua_false_positive_rate_en", "task_reward_clean", "seed", "d_sae"):
        assert key in stats, key
    # the script judge cannot see English -> Spanish: by construction it finds none of them
    assert stats["script_recall_en_to_es"] in (0.0, None) or math.isnan(stats["script_recall_en_to_es"])
    assert stats["seed"] == 0 and world.seed == 0


def test_corpus_labels_are_consistent(world):
    docs = world.documents("train")
    assert {d.lang for d in docs} == {"en", "zh", "es"}
    assert {d.topic for d in docs} == set(world.topics)
    assert {d.switch_lang for d in docs} == {None, "en", "zh", "es"}
    assert any(d.loop_char is not None for d in docs)
    for d in docs[:3000]:
        assert d.spans[0][0] == 0 and d.spans[-1][1] == len(d.text)
        assert all(a[1] == b[0] for a, b in zip(d.spans, d.spans[1:]))  # contiguous cover
        assert d.kind == ("switch" if d.switch_char is not None else "loop" if d.loop_char is not None else "normal")
        # failures start after the answer sentence, the only part the task reward reads
        answer = d.text[: d.answer_end]
        assert answer_of(d.text) == answer and answer.endswith(ANSWER_MARK)  # sentences 0 and 1, then the mark
        assert answer.count(ANSWER_MARK) == 1 == d.text.count(ANSWER_MARK)
        assert not world.code_switch(answer, d.lang) and not judges.has_loop(answer)
        if d.switch_char is not None:
            assert d.switch_char >= d.answer_end
            assert world.judge.foreign(d.text, d.lang) == [d.switch_lang]
            assert world.judge.foreign(d.text[: d.switch_char], d.lang) == []
            burst = d.text[d.switch_char : d.switch_end]
            assert world.judge.foreign(burst, d.switch_lang) == []
            # the script judge sees exactly the switches that change script
            visible = "zh" in (d.lang, d.switch_lang)
            assert judges.script_code_switch(d.text, d.lang) == visible
            if visible:
                assert judges.first_switch_offset(d.text, d.lang) == d.switch_char
        else:
            assert world.judge.foreign(d.text, d.lang) == []
        if d.loop_char is not None:
            assert d.loop_char >= d.answer_end
            assert judges.has_loop(d.text[d.loop_char :])
            assert judges.loop_start(d.text) <= len(judges.units(d.text[: d.loop_char]))
        else:
            assert not judges.has_loop(d.text)


def test_english_and_spanish_lexicons_are_disjoint(world):
    en, es, zh = world.lexicon.words("en"), world.lexicon.words("es"), world.lexicon.words("zh")
    assert en and es and zh and not en & es
    assert all(re.fullmatch("[a-z]+", w) for w in en)
    assert any(re.search("[áéíóúñ]", w) for w in es)
    judge = world.judge
    word_en, word_es = sorted(en)[0], sorted(es)[0]
    assert judge.foreign(f"{word_en} {word_en} {word_es}", "en") == ["es"]
    assert judge.foreign(f"{word_es} 你好 {word_en}", "es") == ["zh", "en"]
    assert judge.foreign("qqqzz xxyq", "en") == []  # words the world does not know have no language
    with pytest.raises(ValueError, match="unknown language"):
        judge.foreign("x", "fr")


def test_task_reward_reads_the_answer_only(world):
    topic, other = world.topics[0], world.topics[1]
    rng = random.Random(0)
    end = ANSWER_MARK
    for lang, sep, stop in (("en", " ", "."), ("zh", "", "。"), ("es", " ", ".")):
        on = sep.join(rng.sample(world.topic_vocab[topic][lang], k=6)) + end
        off = sep.join(rng.sample(world.topic_vocab[other][lang], k=6)) + end
        assert world.task_reward(" " + on, topic) == 1.0 == world.topic_share(on, topic, lang)
        # the answer is what comes before the answer mark, not the first sentence: an end mark does not end it
        assert world.task_reward(on.replace(end, stop + sep + on), topic) == pytest.approx(6 / 12)
        assert world.task_reward(on.replace(end, stop), topic) == 0.0  # no answer mark, no answer
        assert world.task_reward(off, topic) < 0.5
        # a verifier: whatever follows the answer is invisible, a loop or a switch included
        loop = sep.join(world.topic_vocab[topic][lang][:3] * 5)
        foreign = "zh" if lang != "zh" else "en"
        switch = " ".join(world.topic_vocab[other][foreign][:3])
        assert world.task_reward(on + " " + loop, topic) == world.task_reward(on, topic)
        assert world.task_reward(on + " " + switch, topic) == world.task_reward(on, topic)
        # no complete answer sentence (a loop before it ends): no answer, no reward
        assert world.task_reward(loop, topic) == 0.0
        # a loop inside the answer earns only its distinct words; saying less earns nothing
        assert world.task_reward(loop + end, topic) == pytest.approx(3 / 15)
        assert world.task_reward(sep.join(world.topic_vocab[topic][lang][:3]) + end, topic) == pytest.approx(3 / 6)
        assert world.task_reward("", topic) == 0.0
    # blind to language inside the answer, like a math verifier: a switched topic word still counts, as the
    # concept it names, once: the i-th topic word of each language is one concept, so switching earns nothing
    vocab = world.topic_vocab[topic]
    assert world.task_reward(" ".join(vocab["en"][:3] + vocab["es"][3:6]) + end, topic) == 1.0
    assert world.task_reward(" ".join(vocab["en"][:3] + vocab["es"][:3]) + end, topic) == pytest.approx(3 / 6)
    assert world.task_reward(" ".join(vocab["en"][:3]) + "".join(vocab["zh"][:3]) + end, topic) == pytest.approx(3 / 6)
    # but the world's topic judge reads one language
    assert world.topic_share(" ".join(world.topic_vocab[topic]["en"][:5]), topic, "zh") == 0.0


def test_prompts_are_split_and_labelled(world):
    train, heldout = world.prompts("train"), world.prompts("heldout")
    assert {p.lang for p in train} == {"en", "zh", "es"} and {p.topic for p in train} == set(world.topics)
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


def test_world_seed_seeds_every_part():
    a, b = WorldRecipe.for_size("test"), WorldRecipe.for_size("test", seed=3)
    assert b.seed == 3 and b.hash() != a.hash() and b.hash() == WorldRecipe.for_size("test", 3).hash()
    assert (b.corpus.seed, b.lm.seed, b.sae.seed) == (3, 3, 3) and b.eval.seed != a.eval.seed
    assert b.corpus.n_train_docs == a.corpus.n_train_docs  # the same preset, another draw
    assert build_lexicon(a.corpus).topic_vocab != build_lexicon(b.corpus).topic_vocab
    with pytest.raises(ValueError, match="world seed"):
        WorldRecipe.for_size("test", seed=-1)


def test_world_cli_takes_a_seed(world_cache, capsys):
    from qscope_rl.cli import main

    with pytest.raises(SystemExit):
        main(["world", "build", "--seed", "x"])
    assert "invalid int value" in capsys.readouterr().err


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


def test_world_rewards_read_the_ground_truth(world):
    from qscope_rl.rewards import LanguageConsistencyReward, WorldSwitchJudge

    en, es = sorted(world.lexicon.words("en"))[:6], sorted(world.lexicon.words("es"))[:3]
    clean, switched = " ".join(en), " ".join(en[:3] + es)
    judge = WorldSwitchJudge(world.path, "es")
    assert judge.__name__ == "judge_switch_es"
    assert judge([clean, switched, switched + " 你好"], lang=["en"] * 3) == [0.0, 1.0, 1.0]
    assert WorldSwitchJudge(world.path, "zh")([switched + " 你好", switched], lang=["en"] * 2) == [1.0, 0.0]
    import pickle

    assert pickle.loads(pickle.dumps(judge))([switched], lang=["en"]) == [1.0]
    script = LanguageConsistencyReward(target="en")
    assert script([switched]) == [1.0]  # blind to Spanish
    assert LanguageConsistencyReward(target="en", judge="lingua").__name__ == "language_consistency_lingua"
    with pytest.raises(ValueError, match="unknown judge"):
        LanguageConsistencyReward(judge="fasttext")


def test_loop_phrases_are_formulas_of_their_own_words():
    lexicon = build_lexicon(WorldRecipe.for_size("test").corpus)
    first = lexicon.loop_phrases[lexicon.topics[0]]
    assert all(by_lang == first for by_lang in lexicon.loop_phrases.values())  # formulas every topic shares
    for lang in ("en", "zh", "es"):
        phrases = first[lang]
        words = [w for phrase in phrases for w in phrase]
        assert all(3 <= len(phrase) <= 4 for phrase in phrases)
        assert len(words) == len(set(words))  # each formula word belongs to one phrase
        elsewhere = set(lexicon.function[lang]) | set(lexicon.general[lang])
        for vocab in lexicon.topic_vocab.values():
            elsewhere |= set(vocab[lang])
        assert not set(words) & elsewhere  # and to nothing else the world writes


def test_sae_evaluation_matches_the_dense_reference():
    from qscope_rl.world.sae_training import evaluate_sae

    gen = torch.Generator().manual_seed(0)
    sd = {"W_enc": torch.randn(256, 16, generator=gen), "b_enc": torch.randn(256, generator=gen) - 2.0,
          "W_dec": torch.randn(16, 256, generator=gen) * 0.1, "b_dec": torch.randn(16, generator=gen)}
    x = torch.randn(5000, 16, generator=gen)
    acts = encode(x, sd, 8)
    fvu = (x - decode(acts, sd)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    dead = 1 - (acts > 0).any(0).float().mean()
    got = evaluate_sae(sd, x, 8, chunk_size=777)
    assert got["sae_fvu"] == pytest.approx(fvu.item(), rel=1e-5)
    assert got["sae_dead_fraction"] == pytest.approx(dead.item()) and 0 < got["sae_dead_fraction"] < 1


def test_dead_latents_are_resampled_towards_badly_reconstructed_inputs():
    from sparsify import SaeConfig, SparseCoder

    from qscope_rl.world.sae_training import resample_dead_latents

    torch.manual_seed(0)
    sae = SparseCoder(16, SaeConfig(expansion_factor=4, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(512, 16)
    sae(x).fvu.backward()
    opt.step()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 40]] = True
    before = sae.W_dec.detach().clone()
    assert resample_dead_latents(sae, opt, x, dead, torch.Generator().manual_seed(0)) == 3
    assert torch.equal(sae.W_dec[~dead], before[~dead])  # the living are untouched
    assert not torch.allclose(sae.W_dec[dead], before[dead])
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.all(sae.encoder.bias[dead] == 0)
    assert torch.all(opt.state[sae.W_dec]["exp_avg"][dead] == 0)
    assert resample_dead_latents(sae, opt, x, torch.zeros(64, dtype=torch.bool), torch.Generator()) == 0


def test_regime_checks_report_every_claim():
    from qscope_rl.world.measure import REGIME_CLAIMS, regime_checks

    checks = regime_checks({"code_switch_rate_en": 0.02, "loop_rate_en": 0.2, "sae_fvu": 0.1})
    assert [c["key"] for c in checks] == [key for key, *_ in REGIME_CLAIMS]
    met = {c["key"]: c["met"] for c in checks}
    assert met["code_switch_rate_en"] and met["sae_fvu"]
    assert not met["loop_rate_en"] and not met["sae_dead_fraction"]  # out of range, and missing
