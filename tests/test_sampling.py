"""The demo's CPU sampler (`qscope_rl.world.sampling`): the distribution torch.multinomial samples, with one uniform
per row; zero-probability tokens never drawn; bad rows refused; torch's own sampler back on every exit."""

import subprocess
import sys

import pytest
import torch
from scipy.stats import chisquare

from qscope_rl.world import sampling
from qscope_rl.world.sampling import cpu_sampling, inverse_cdf_sample
from tests.tiny_models import tiny_model


def test_draws_follow_the_distribution_and_skip_zero_probabilities():
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 5.0, 1.0, 0.0])  # unnormalised, zeros inside and at both ends
    n = 200_000
    picks = inverse_cdf_sample(weights.repeat(n, 1), torch.Generator().manual_seed(0))
    assert picks.shape == (n, 1) and picks.dtype == torch.long
    counts = torch.bincount(picks.flatten(), minlength=len(weights))
    assert counts[weights == 0].sum() == 0
    expected = weights.double() / weights.double().sum() * n
    keep = weights > 0
    assert chisquare(counts[keep].double().numpy(), expected[keep].numpy()).pvalue > 1e-3
    # a 1-D row gives one (1,) draw, as torch.multinomial(probs, 1) does
    assert inverse_cdf_sample(weights).shape == (1,)


def test_a_uniform_draw_at_the_top_never_leaves_the_support(monkeypatch):
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0]])
    largest_below_one = 1.0 - 2.0 ** -53
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.full(shape, largest_below_one,
                                                                                dtype=torch.float64))
    assert inverse_cdf_sample(probs).flatten().tolist() == [1, 0]
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=torch.float64))
    assert inverse_cdf_sample(probs).flatten().tolist() == [0, 0]


@pytest.mark.parametrize("probs, match", [
    (torch.tensor([[0.5, -0.1, 0.6]]), "non-negative"),
    (torch.tensor([[0.5, float("nan"), 0.5]]), "finite"),
    (torch.tensor([[0.5, float("inf"), 0.5]]), "finite"),
    (torch.tensor([[0.5, 0.5], [0.0, 0.0]]), "sum to 0"),
])
def test_invalid_distributions_are_refused(probs, match):
    with pytest.raises(RuntimeError, match=match):
        inverse_cdf_sample(probs)


def test_bad_shapes_are_refused():
    for probs in (torch.ones(2, 3, 4), torch.ones(2, 0)):
        with pytest.raises(ValueError, match="probs must be"):
            inverse_cdf_sample(probs)


def test_cpu_sampling_is_scoped_and_delegates_what_it_does_not_cover():
    original = torch.multinomial
    probs = torch.softmax(torch.randn(4, 10), -1)
    with cpu_sampling():
        assert torch.multinomial is not original
        # several draws go to torch's own sampler: the same draws for the same generator state
        ours = torch.multinomial(probs, 3, generator=torch.Generator().manual_seed(1))
        theirs = original(probs, 3, generator=torch.Generator().manual_seed(1))
        assert torch.equal(ours, theirs)
    assert torch.multinomial is original
    with pytest.raises(KeyError), cpu_sampling():
        raise KeyError("an exception inside the block")
    assert torch.multinomial is original


def test_generate_samples_through_it_and_top_k_1_is_greedy():
    model = tiny_model("qwen3").eval()
    ids = torch.tensor([[5, 9, 2, 7], [3, 3, 8, 1]])
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sampling._multinomial(*args, **kwargs)

    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with cpu_sampling():
        torch.multinomial = counting  # count the steps that sampled through the installed sampler
        sampled = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                                 top_k=1)
    assert len(calls) == 6 and all(shape == (2, model.config.vocab_size) for shape in calls)
    assert torch.equal(sampled, greedy)


def test_the_demo_workers_sample_with_it():
    code = ("import torch; from qscope_rl.demo.main_job import _single_thread_worker; "
            "from qscope_rl.world import sampling; _single_thread_worker(); "
            "assert torch.multinomial is sampling._multinomial")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_world_builds_with_torchs_sampler_even_in_a_demo_worker(tmp_path, monkeypatch):
    from qscope_rl.world import build

    seen = []

    def first_stage(recipe, out):  # stands in for the build's stages: which sampler would they sample with?
        seen.append(torch.multinomial is sampling._torch_multinomial)
        raise KeyboardInterrupt  # stop there, as a Ctrl-C would: nothing is left behind

    monkeypatch.setattr(build, "_build_into", first_stage)
    with cpu_sampling(), pytest.raises(KeyboardInterrupt):
        build._build_here(build.WorldRecipe.for_size("test"), tmp_path / "world", force=False)
    assert seen == [True] and not any(tmp_path.iterdir())
    assert torch.multinomial is sampling._torch_multinomial  # and the sampler before the block is back after it
