"""Dense steering vectors (DiffMean): residual means against an unbatched forward, the edit's size, bad input."""

import pytest
import torch
from tiny_models import tiny_model

from qscope_rl.hooks import capture_residual
from qscope_rl.tools.steering_vectors import diff_mean, mean_residual, steer_vector


class _Tokenizer:
    """Characters as token ids: texts of different lengths make padded batches."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=256):
        return {"input_ids": [[1 + ord(c) % 50 for c in t][:max_length] for t in texts]}


TEXTS = ["a short one", "a much longer text than the first one", "mid length", "z"]


def _reference_mean(model, texts, layer):
    """Each text alone (no padding), the residual after ``layer`` from HF's hidden states, token mean per text."""
    tok = _Tokenizer()
    means = []
    for t in texts:
        ids = torch.tensor([tok([t])["input_ids"][0]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
        means.append(hidden[0].mean(0))
    return torch.stack(means).mean(0)


def test_mean_residual_and_diff_mean_match_unbatched_forwards():
    model = tiny_model()
    got = mean_residual(model, _Tokenizer(), TEXTS, layer=1, batch_size=3)
    torch.testing.assert_close(got, _reference_mean(model, TEXTS, 1), atol=1e-5, rtol=1e-4)
    vector = diff_mean(model, _Tokenizer(), TEXTS[:2], TEXTS[2:], layer=0)
    torch.testing.assert_close(vector, _reference_mean(model, TEXTS[:2], 0) - _reference_mean(model, TEXTS[2:], 0),
                               atol=1e-5, rtol=1e-4)


def test_steer_vector_adds_strength_times_vector_on_chosen_rows_and_leaves_no_hook():
    model = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with capture_residual(model, 0) as plain:
            before = model(input_ids=ids).logits
        with steer_vector(model, vector, layer=0, strength=-2.0, rows=[1]), capture_residual(model, 0) as steered:
            model(input_ids=ids)
        again = model(input_ids=ids).logits
    torch.testing.assert_close(steered.last[1], plain.last[1] - 2.0 * vector)
    torch.testing.assert_close(steered.last[0], plain.last[0])  # row 0 not steered
    torch.testing.assert_close(again, before)  # the hook is gone


def test_bad_input_is_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="positive texts"):
        diff_mean(model, _Tokenizer(), [], TEXTS, layer=0)
    with pytest.raises(ValueError, match="layer 9"):
        mean_residual(model, _Tokenizer(), TEXTS, layer=9)
    with pytest.raises(ValueError, match="shape"):
        steer_vector(model, torch.zeros(3), layer=0)
    with pytest.raises(ValueError, match="finite"):
        steer_vector(model, torch.full((model.config.hidden_size,), float("nan")), layer=0)
    with pytest.raises(ValueError, match="finite"):
        steer_vector(model, torch.ones(model.config.hidden_size), layer=0, strength=float("inf"))
    with pytest.raises(ValueError, match="layer 5"):
        steer_vector(model, torch.ones(model.config.hidden_size), layer=5)
    with pytest.raises(ValueError, match="batch_size"):
        mean_residual(model, _Tokenizer(), TEXTS, layer=0, batch_size=0)
