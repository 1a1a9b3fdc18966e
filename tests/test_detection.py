"""Detection: alignment of completion activations in TRL's layout, score math, early (pre-activation) onset."""

import pytest
import torch
from tiny_models import HIDDEN, tiny_model
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder, capture_residual, load_sae
from qscope_rl.features.detection import (
    CompletionActivations,
    code_switch_scores,
    encode_completions,
    repetition_scores,
)
from qscope_rl.features.feature_pack import Feature, FeaturePack, FeaturePackError

D_SAE, K, LAYER, EOS, PAD = 96, 6, 1, 3, 3


def random_sae(d_in=HIDDEN, d_sae=D_SAE, k=K, layer=LAYER, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_sae, d_in, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "W_dec": torch.randn(d_in, d_sae, generator=g), "b_dec": torch.zeros(d_in)}
    return SparseAutoencoder.from_weights(weights, architecture="topk", k=k, layer=layer)


def pack_of(ids, d_sae=D_SAE, layer=LAYER):
    return FeaturePack("p", "contrastive", "m", "s", layer, d_sae, HIDDEN,
                       [Feature(i, str(i), 1.0, {"mean_pre": 0.0}) for i in ids])


def trl_batch(prompts, completions):
    """TRL's layout: prompts left-padded to P, completions right-padded to T, mask True through EOS."""
    P, T = max(map(len, prompts)), max(max(map(len, completions)), 1)
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    completion_ids = torch.tensor([c + [PAD] * (T - len(c)) for c in completions])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])
    return prompt_ids, completion_ids, prompt_mask, completion_mask


@pytest.fixture(scope="module")
def rollouts():
    model = tiny_model("qwen3")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    # EOS ends the first; the second is EMPTY (EOS as the very first token is still a real token,
    # so take a truly empty one too); the third stops at the length limit.
    completions = [[20, 21, EOS], [], [30, 31, 32, 33, 34]]
    prompt_ids, completion_ids, prompt_mask, completion_mask = trl_batch(prompts, completions)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad(), capture_residual(model, LAYER) as cap:
        model(input_ids=input_ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0))
    alone = []
    for p, c in zip(prompts, completions):
        with torch.no_grad(), capture_residual(model, LAYER) as cap_alone:
            model(input_ids=torch.tensor([p + c]))
        alone.append(cap_alone.last[0, len(p):])
    return cap.last, completion_mask, prompt_ids.shape[1], alone


def sorted_dense(values, indices, d_sae=D_SAE):
    return torch.zeros(*values.shape[:-1], d_sae).scatter_add_(-1, indices, values)


def test_alignment_matches_encoding_each_completion_alone(rollouts):
    hidden, completion_mask, P, alone = rollouts
    sae = random_sae()
    acts = encode_completions(sae, hidden, completion_mask, prompt_length=P)
    assert acts.values.shape == (3, completion_mask.shape[1], K) and len(acts) == 3
    assert acts.mask.tolist() == completion_mask.bool().tolist()
    for i, h in enumerate(alone):
        got = acts.completion(i)
        assert got.values.shape[0] == len(h)  # the empty completion gives (0, k)
        ref = sae.encode_sparse(h)
        assert_close(sorted_dense(got.values, got.indices), sorted_dense(ref.values, ref.indices),
                     atol=1e-4, rtol=1e-4)
    assert float(acts.values[~acts.mask].abs().sum()) == 0.0  # nothing on padding
    # completion-only hidden states, prompt_length inferred
    again = encode_completions(sae, hidden[:, P:], completion_mask)
    assert torch.equal(again.values, acts.values) and torch.equal(again.indices, acts.indices)
    inferred = encode_completions(sae, hidden, completion_mask)
    assert torch.equal(inferred.values, acts.values)


def test_shape_errors(rollouts):
    hidden, completion_mask, P, _ = rollouts
    sae = random_sae()
    with pytest.raises(ValueError, match="prompt_length"):
        encode_completions(sae, hidden, completion_mask, prompt_length=P + 1)
    with pytest.raises(ValueError, match="completion_mask must be"):
        encode_completions(sae, hidden, completion_mask[:2])
    with pytest.raises(ValueError, match="d_in="):
        encode_completions(random_sae(d_in=HIDDEN * 2), hidden, completion_mask)
    with pytest.raises(ValueError, match="out of range"):
        encode_completions(sae, hidden, completion_mask, tracked_ids=[D_SAE])


def hand_made_acts():
    # 2 completions x 4 tokens x k=2; completion 1 has 2 real tokens.
    indices = torch.tensor([[[1, 5], [5, 7], [2, 3], [7, 1]],
                            [[4, 2], [7, 9], [0, 0], [0, 0]]])
    values = torch.tensor([[[1.0, 0.5], [2.0, 3.0], [1.0, 1.0], [0.25, 4.0]],
                           [[1.0, 1.0], [0.5, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return CompletionActivations(values, indices, mask, d_sae=D_SAE)


def test_code_switch_scores_by_hand():
    acts = hand_made_acts()
    scores = code_switch_scores(acts, pack_of([5, 7]))
    assert_close(scores.per_token, torch.tensor([[0.5, 5.0, 0.0, 0.25], [0.0, 0.5, 0.0, 0.0]]))
    assert_close(scores.per_completion, torch.tensor([5.0, 0.5]))
    assert scores.onset.tolist() == [0, 1]
    assert code_switch_scores(acts, pack_of([5, 7]), threshold=1.0).onset.tolist() == [1, -1]
    assert_close(code_switch_scores(acts, pack_of([5, 7]), reduce="share").per_completion, torch.tensor([0.75, 0.5]))
    assert_close(code_switch_scores(acts, pack_of([5, 7]), reduce="mean").per_completion,
                 torch.tensor([5.75 / 4, 0.25]))
    assert code_switch_scores(acts, pack_of([42])).onset.tolist() == [-1, -1]
    # one pack per completion (a batch mixing English and Chinese prompts)
    mixed = code_switch_scores(acts, [pack_of([5, 7]), pack_of([4])])
    assert_close(mixed.per_token[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert_close(mixed.per_token[0], scores.per_token[0])
    rep = repetition_scores(acts, pack_of([1]))
    assert_close(rep.per_token, torch.tensor([[1.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(rep.per_completion, torch.tensor([1.25, 0.0]))


def test_packs_from_another_sae_and_untracked_pre_are_refused():
    acts = hand_made_acts()
    with pytest.raises(FeaturePackError, match="another SAE.*d_sae 512"):
        code_switch_scores(acts, pack_of([5], d_sae=512))
    with pytest.raises(ValueError, match="track no pre-activations"):
        code_switch_scores(acts, pack_of([5]), use_pre=True)
    with pytest.raises(ValueError, match="one pack or one each"):
        code_switch_scores(acts, [pack_of([5])])
    with pytest.raises(ValueError, match="reduce must be"):
        repetition_scores(acts, pack_of([5]), reduce="median")


def test_pre_activation_onset_is_never_later_and_keeps_grad():
    sae = random_sae(seed=1)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(16, 12, HIDDEN, generator=g, requires_grad=True)
    mask = torch.arange(12)[None] < torch.randint(0, 13, (16, 1), generator=g)
    pack = pack_of([3, 17, 40])
    acts = encode_completions(sae, hidden, mask, tracked_ids=pack.ids)
    act, pre = code_switch_scores(acts, pack), code_switch_scores(acts, pack, use_pre=True)
    assert bool((pre.per_token >= act.per_token * (1 - 1e-5) - 1e-5).all())  # equal up to matmul rounding
    fired = act.onset >= 0
    assert bool(fired.any()) and bool((pre.onset[fired] >= 0).all())
    assert bool((pre.onset[fired] <= act.onset[fired]).all())
    assert bool((pre.onset[~mask.any(1)] == -1).all())  # empty completions flag nothing
    # pre-activations are the SAE's own, and differentiable (for SASFT-style losses)
    assert_close(acts.pre[mask], sae.pre_acts(hidden[mask])[:, pack.ids])
    acts.pre.sum().backward()
    assert hidden.grad is not None and acts.values.grad_fn is None


# -- the demo world: real sampled rollouts -----------------------------------------------------------


@pytest.fixture(scope="module")
def world_rollouts(world):
    """Held-out prompts of both languages, sampled by the world model and laid out as TRL does."""
    tok, model = world.tokenizer, world.model
    prompts = [p.text for lang in ("en", "zh") for p in world.prompts("heldout", lang)[:4]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and bool((enc["attention_mask"][:, 0] == 0).any())
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=24, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
    completion = gen[:, enc["input_ids"].shape[1]:]
    is_eos = completion == tok.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
    mask = torch.arange(completion.shape[1])[None] <= first_eos[:, None]
    mask[1] = False  # an EMPTY completion (its tokens are padding)
    completion[1] = tok.pad_token_id
    if not bool((mask.sum(1) < completion.shape[1]).any()):  # make sure one row ends early at an EOS
        completion[2, 5], mask[2, 6:] = tok.eos_token_id, False
    attention = torch.cat([enc["attention_mask"], mask.long()], 1)
    with torch.no_grad(), capture_residual(model, world.layer) as cap:
        model(input_ids=torch.cat([enc["input_ids"], completion], 1), attention_mask=attention,
              position_ids=(attention.cumsum(1) - 1).clamp(min=0))
    return enc, completion, mask, cap.last


def test_world_alignment_against_each_completion_alone(world, world_rollouts):
    sae = load_sae(world.sae_dir, layer=world.layer)
    enc, completion, mask, hidden = world_rollouts
    acts = encode_completions(sae, hidden, mask, prompt_length=enc["input_ids"].shape[1])
    for i in range(len(mask)):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        ids = torch.cat([prompt, completion[i][mask[i]]])[None]
        with torch.no_grad(), capture_residual(world.model, world.layer) as cap:
            world.model(input_ids=ids)
        ref = sae.encode(cap.last[0, len(prompt):])  # dense, the model-card math
        got = acts.completion(i)
        assert got.values.shape[0] == int(mask[i].sum()) == ref.shape[0]
        assert_close(sorted_dense(got.values, got.indices, sae.d_sae), ref, atol=1e-3, rtol=1e-3)
    assert acts.completion(1).values.shape[0] == 0


@pytest.fixture(scope="module")
def language_packs(world):
    from qscope_rl.features.discovery import discover_language_features

    sae = load_sae(world.sae_dir, layer=world.layer)
    train = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    by_lang = {lang: [d.text for d in train if d.lang == lang][:150] for lang in ("en", "zh")}
    return sae, discover_language_features(world.model, world.tokenizer, sae, by_lang, top_k=8, batch_size=32)


def encode_texts(world, sae, texts, tracked, skip_opening=False):
    """Encode documents; with `skip_opening`, only the tokens after the first sentence (what a prompt shows),
    as a detector sees completions: the first tokens of a context-free document are no completion's."""
    enc = world.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad(), capture_residual(world.model, world.layer) as cap:
        world.model(**enc)
    mask = enc["attention_mask"].bool()
    if skip_opening:
        for row, text in enumerate(texts):
            opening = min(i for i in (text.find("."), text.find("\u3002")) if i >= 0) + 1
            mask[row, : len(world.tokenizer(text[:opening])["input_ids"])] = False
    return enc, encode_completions(sae, cap.last, mask, tracked_ids=tracked)


def test_world_switch_onset_pre_not_later_than_activation(world, language_packs):
    from qscope_rl.features.detection import calibrate_threshold

    sae, packs = language_packs
    tracked = torch.cat([packs["en"].ids, packs["zh"].ids])
    clean = [d.text for d in world.documents("train") if d.lang == "en" and d.switch_char is None
             and d.loop_char is None][:100]
    _, clean_acts = encode_texts(world, sae, clean, tracked, skip_opening=True)
    threshold = calibrate_threshold(clean_acts, packs["zh"], quantile=0.999)  # on training text only
    # English documents switched into Chinese (the zh pack's language; switches into Spanish are other features),
    # from the training split: the held-out one of the test world holds only a handful
    docs = [d for d in world.documents("train") if d.switch_lang == "zh" and d.lang == "en"][:24]
    enc, acts = encode_texts(world, sae, [d.text for d in docs], tracked, skip_opening=True)
    act = code_switch_scores(acts, packs["zh"], threshold=threshold)
    pre = code_switch_scores(acts, packs["zh"], use_pre=True, threshold=threshold)
    fired = act.onset >= 0
    assert float(fired.float().mean()) >= 0.8  # most switched documents are flagged
    assert bool((pre.onset[fired] >= 0).all()) and bool((pre.onset[fired] <= act.onset[fired]).all())
    # the calibrated onset is at the switch or a token before it: the first token reaching the switch char
    offsets = world.tokenizer([d.text for d in docs], return_offsets_mapping=True)["offset_mapping"]
    switch_token = torch.tensor([next(j for j, (_, end) in enumerate(o) if end > d.switch_char)
                                 for o, d in zip(offsets, docs)])
    lead = switch_token - act.onset
    assert float(((lead >= 0) & (lead <= 1) & fired).float().mean()) >= 0.6


def test_calibrate_threshold_flags_the_requested_share_of_clean_tokens():
    from qscope_rl.features.detection import calibrate_threshold

    acts = hand_made_acts()  # per-token scores of pack [5, 7]: 0.5, 5, 0, 0.25 | 0, 0.5
    assert calibrate_threshold(acts, pack_of([5, 7]), quantile=1.0) == pytest.approx(5.0)
    assert calibrate_threshold(acts, pack_of([5, 7]), quantile=0.0) == pytest.approx(0.0)
    threshold = calibrate_threshold(acts, pack_of([5, 7]), quantile=0.8)
    assert code_switch_scores(acts, pack_of([5, 7]), threshold=threshold).onset.tolist() == [1, -1]
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(acts, pack_of([5]), quantile=2.0)
