"""Capture and steering hooks: every model family, wrappers, removal on every exit path."""

import pytest
import torch
from tiny_models import FAMILIES, HIDDEN, VOCAB, tiny_model
from torch.testing import assert_close

from qscope_rl import (
    ForwardToLayer,
    SparseAutoencoder,
    add_to_residual,
    capture_residual,
    decoder_layer,
    decoder_layers,
    hidden_size,
    steer,
)


def forward_hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_equals_hidden_states(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 6))
    assert len(decoder_layers(model)) == 3 and hidden_size(model) == HIDDEN
    model(input_ids=ids, output_hidden_states=True)  # transformers installs its own recorders once
    hooks_before = forward_hook_count(model)
    for layer in (0, 1):  # the last entry of hidden_states is after the final norm in most families
        with torch.no_grad(), capture_residual(model, layer) as cap:
            out = model(input_ids=ids, output_hidden_states=True)
        assert cap.last.shape == (2, 6, HIDDEN)
        assert_close(cap.last, out.hidden_states[layer + 1])
    assert forward_hook_count(model) == hooks_before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_to_layer_stops_after_it(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
    hooks_before = forward_hook_count(model)
    ran = []
    last = decoder_layer(model, 2).register_forward_hook(lambda *_: ran.append(True))
    try:
        with torch.no_grad(), ForwardToLayer(model, 1) as forward:
            assert_close(forward.run(input_ids=ids), full[2])
            assert_close(forward.run(input_ids=ids[:1]), full[2][:1])  # each run returns its own residual
        assert not ran  # the layers after layer 1 never ran
        with pytest.raises(RuntimeError, match="boom"), ForwardToLayer(model, 1):
            raise RuntimeError("boom")
    finally:
        last.remove()
    assert forward_hook_count(model) == hooks_before  # both of its hooks are gone, exceptions included


def test_capture_through_peft_and_ddp():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen3")
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad(), capture_residual(peft_model, 1) as cap:
        peft_model(input_ids=ids)
    assert_close(cap.last, reference)  # LoRA B starts at zero: same activations

    class Wrapper(torch.nn.Module):  # the shape of DDP / DeepSpeedEngine: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert decoder_layer(Wrapper(peft_model), 1) is decoder_layers(model)[1]


def test_capture_during_generation_covers_every_position():
    model = tiny_model("qwen3")
    ids = torch.randint(0, VOCAB, (2, 4))
    with torch.no_grad(), capture_residual(model, 1) as cap:
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    captured = cap.concatenated()  # prefill + one chunk per decode step (the last token is never fed)
    assert captured.shape == (2, out.shape[1] - 1, HIDDEN)
    with torch.no_grad():
        full = model(input_ids=out[:, :-1], output_hidden_states=True).hidden_states[2]
    assert_close(captured, full, rtol=1e-4, atol=1e-4)


def test_hooks_removed_after_exception():
    model = tiny_model("qwen3")
    sae = random_sae(layer=1)
    before = forward_hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_residual(model, 1), steer(model, sae, {0: 1.0}):
            assert forward_hook_count(model) == before + 2
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))
            raise RuntimeError("boom")
    assert forward_hook_count(model) == before


def test_bad_layer_is_a_clear_error():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"layer 3 does not exist: Qwen3ForCausalLM has 3 decoder layers \(0..2\)"):
        capture_residual(model, 3)
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def random_sae(layer, d_sae=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_sae, HIDDEN, generator=g), "b_enc": torch.zeros(d_sae),
         "W_dec": torch.randn(HIDDEN, d_sae, generator=g), "b_dec": torch.zeros(HIDDEN)}
    return SparseAutoencoder.from_weights(w, architecture="topk", k=4, layer=layer)


def test_steering_moves_next_token_distribution():
    model = tiny_model("qwen3")
    target = 7
    sae = random_sae(layer=2)
    with torch.no_grad():  # make feature 0 write the target token's unembedding direction
        sae.W_dec[:, 0] = model.lm_head.weight[target] / model.lm_head.weight[target].norm()
    ids = torch.randint(0, VOCAB, (3, 6))

    def p_target(**steering):
        with torch.no_grad():
            if not steering:
                return model(input_ids=ids).logits[:, -1].softmax(-1)[:, target]
            with steer(model, sae, **steering):
                return model(input_ids=ids).logits[:, -1].softmax(-1)[:, target]

    base = p_target()
    assert (p_target(features={0: 20.0}) > base).all()
    assert (p_target(features={0: -20.0}) < base).all()
    only_row1 = p_target(features={0: 20.0}, rows=[1])
    assert only_row1[1] > base[1] and torch.allclose(only_row1[[0, 2]], base[[0, 2]])


def test_steering_positions_and_clamp():
    model = tiny_model("qwen3")
    sae = random_sae(layer=1)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), capture_residual(model, 1) as plain:
        model(input_ids=ids)
    with torch.no_grad(), steer(model, sae, {3: 2.0}, positions=[1, 4]), capture_residual(model, 1) as edited:
        model(input_ids=ids)
    delta = edited.last - plain.last
    expected = torch.zeros_like(delta)
    expected[:, [1, 4]] = 2.0 * sae.W_dec[:, 3]
    assert_close(delta, expected)
    # Clamp: the edit is (v - a_j(h)) * d_j, with a_j the SAE's own activation of feature j.
    acts = sae.encode(plain.last)
    feature = int(acts[0, 0].argmax())
    with torch.no_grad(), steer(model, sae, {feature: 0.5}, mode="clamp"), capture_residual(model, 1) as cl:
        model(input_ids=ids)
    expected = (0.5 - acts[..., feature]).unsqueeze(-1) * sae.W_dec[:, feature]
    assert_close(cl.last - plain.last, expected, rtol=1e-4, atol=1e-4)


def test_steering_one_row_during_generation():
    model = tiny_model("qwen3")
    sae = random_sae(layer=1)
    ids = torch.randint(0, VOCAB, (1, 4)).repeat(2, 1)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, **gen)
        with steer(model, sae, {0: 50.0}, rows=[1]):
            steered = model.generate(input_ids=ids, **gen)
    assert torch.equal(steered[0], plain[0])
    assert not torch.equal(steered[1], plain[1])


def test_steering_input_validation():
    model = tiny_model("qwen3")
    sae = random_sae(layer=1)
    with pytest.raises(ValueError, match="out of range"):
        steer(model, sae, {99: 1.0})
    with pytest.raises(ValueError, match="unknown steering mode"):
        steer(model, sae, {0: 1.0}, mode="multiply")
    with pytest.raises(ValueError, match="at least one"):
        steer(model, sae, {})
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        add_to_residual(model, 1, torch.zeros(5))
    other = SparseAutoencoder(HIDDEN + 1, 8, architecture="topk", k=2, layer=1)
    with pytest.raises(ValueError, match="does not match the model's hidden size"):
        steer(model, other, {0: 1.0})
