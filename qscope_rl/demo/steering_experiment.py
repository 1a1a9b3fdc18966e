"""Steering on the demo world: additive, clamp and conditional steering side by side, one protocol for all.

Fixed before any run:
- code-switch suppression: prompts in English, the unwanted-language pack(s) (every other language's SASFT
  monolinguality pack), its top ``top`` features. Effect: the relative cut of the code-switch rate, judged by the
  world's lexicon (the ground truth: a script judge would miss the Spanish switch the es pack suppresses),
  with its 95% bootstrap interval over held-out prompts (each with all its samples: switches cluster by prompt).
  The world's failures are rare (about 1% of English samples at its temperature), so each prompt is sampled
  ``samples`` times (8: 1,024 development and 2,048 held-out samples, the main job's count per policy); with
  one sample per prompt the held-out set had no switch left to cut (2026-12-03, v9 world). Strengths: add at
  -light / -medium / -strong (alpha relative to each feature's contrastive activation difference), clamp to the
  same negative multiples, conditional at factor 0 (remove the feature where it fires; no strength to choose),
  pre_clamp (ours) capping the pre-activation at 0 / -light / -medium.
- topic steering: for each topic, its top ``top`` contrastive features, prompts of the other topics. Effect: the
  share of samples the world's topic judge puts on the target topic. Strengths: add at +medium / +strong /
  +20x, clamp to the same multiples, conditional at factor 2 / 4 / 10.
- the dense yardstick (2026-12-06, fixed before its first run): DiffMean (AxBench's strongest baseline;
  ``qscope_rl.tools.steering_vectors``) at the SAE's layer, the mean residual of up to 300 clean training
  documents per unwanted language (topic) minus that of up to 600 English (other topics') ones, the topic's drawn
  as its feature pack's are; added at -0.25x / -0.5x / -1x of that vector (code-switching) and +1x / +2x / +4x
  (topics), chosen on dev like the rest, never the headline (an SAE mode is). Where it moves a behaviour the
  features do not, the features are the limit, not the layer.
- fluency cost (AxBench): the unsteered model's perplexity on the samples given their prompts, as a ratio to
  its perplexity on the unsteered samples of the same prompts.
- prompts: code-switching on up to 128 development (training split) and 256 held-out English prompts (fewer
  where the world has fewer), each ``samples`` times; topics: all topics' prompts in one generate call, each
  topic's rows steered toward it (a row-restricted hook per topic).
- selection: each mode's strength is chosen on development prompts (training split): the largest effect whose
  perplexity ratio is within the cap (1.5 for code-switching, 3 for topics), else the smallest ratio; the
  headline mode is chosen among the modes by the same rule on the development prompts. Held-out prompts are
  then run once with every mode's chosen strength.
"""

from __future__ import annotations

import contextlib
import random

from .measures import steering_metrics, world_language_vector, world_topic_pack, world_topic_vector

CS_STRENGTHS = {"add": ("-light", "-medium", "-strong"), "clamp": ("-light", "-medium", "-strong"),
                "conditional": (0.0,), "pre_clamp": (0.0, "-light", "-medium"), "diffmean": ("-0.25x", "-0.5x", "-1x")}
TOPIC_STRENGTHS = {"add": ("medium", "strong", "20x"), "clamp": ("medium", "strong", "20x"),
                   "conditional": (2.0, 4.0, 10.0), "diffmean": ("1x", "2x", "4x")}
DENSE = "diffmean"  # the arm that steers with a dense vector, not SAE features
CS_CAP, TOPIC_CAP = 1.5, 3.0
# Printed beside the perplexity ratio, which falls when steered text repeats itself (2026-12-03, v9 world: clamp
# -medium at 0.90x perplexity looped 2.3x as often as unsteered samples); reported, not part of the selection.
DEGENERATION = ("loop_rate", "distinct_2", "mean_units")


def degeneration(m: dict) -> str:
    return f"{m['loop_rate']:>6.3f} {m['distinct_2']:>6.3f} {m['mean_units']:>5.1f}"


def alphas_for(pack, mode: str, strength, top: int) -> dict[int, float]:
    """{feature: strength} for ``mode``: relative presets for add / clamp, a plain factor for conditional."""
    from qscope_rl.tools.steered_generation import relative_strengths

    if mode == "conditional":
        return {f.id: float(strength) for f in pack.features[:top]}
    return relative_strengths(pack, strength, top=top)


def steering(model, sae, alphas, mode: str, rows=None, layer: int | None = None):
    """The context manager of one arm: SAE features through ``steer`` (``alphas``: {feature: strength}), or for
    the DiffMean arm a dense vector (``alphas``: the scaled vector) at ``layer`` (default: the SAE's)."""
    from qscope_rl.tools.steered_generation import steer
    from qscope_rl.tools.steering_vectors import steer_vector

    if mode == DENSE:
        return steer_vector(model, alphas, layer=sae.layer if layer is None else layer, rows=rows)
    if layer is not None and layer != sae.layer:
        raise ValueError(f"SAE features steer at their SAE's layer {sae.layer}, not at layer {layer}")
    return steer(model, sae, alphas, mode=mode, rows=rows)


def dense_strength(strength: str) -> float:
    from qscope_rl.tools.steered_generation import parse_strength

    return parse_strength(strength)[0]


def sae_modes(rows: dict) -> dict:
    """The SAE arms only: the headline is SAE steering's; the dense arm is reported beside it, not chosen."""
    return {mode: row for mode, row in rows.items() if mode != DENSE}


def cut_interval(base: list[bool], steered: list[bool], samples: int, boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(cut, lo, hi): the relative cut of the switch rate, 1 - steered / base, and its 95% bootstrap interval over
    prompts (sample j is prompt j % n, each prompt sampled ``samples`` times in both arms; paired draws)."""
    import numpy as np

    from .stats import bootstrap_draws, ratio

    if len(base) != len(steered) or len(base) % samples:
        raise ValueError(f"cut_interval: {len(base)} and {len(steered)} flags are not the same prompts x "
                         f"{samples} samples")
    n_prompts = len(base) // samples

    def per_prompt(flags):
        return np.asarray(flags, dtype=float).reshape(samples, n_prompts).mean(0)[None]  # (1 seed, prompts)

    r = ratio(per_prompt(steered), per_prompt(base), bootstrap_draws(1, n_prompts, boot, seed))
    return 1 - r["value"], 1 - r["ci"][1], 1 - r["ci"][0]


def choose(options: dict, cap: float):
    """The key whose (effect, ratio) has the largest effect with ratio <= cap, else the smallest ratio."""
    within = {k: v for k, v in options.items() if v[1] <= cap}
    if within:
        return max(within, key=lambda k: within[k][0])
    return min(options, key=lambda k: options[k][1])


def run_groups(world, sae, groups, mode: str, max_new_tokens: int = 48, layer: int | None = None) -> list[dict]:
    """One generate call for every group's prompts, each group's rows steered with its own features (a
    ``steer`` restricted to its rows; None: unsteered), then each group judged on its own. ``groups``: a list of
    (prompts, alphas or None, target topic or None). Every hook is removed on exit (ExitStack)."""
    from qscope_rl.tools.steered_generation import generate

    model, tok = world.model, world.tokenizer
    texts = [p.text for prompts, _, _ in groups for p in prompts]
    with contextlib.ExitStack() as stack:
        start = 0
        for prompts, alphas, _ in groups:
            if alphas is not None:
                stack.enter_context(steering(model, sae, alphas, mode, range(start, start + len(prompts)), layer))
            start += len(prompts)
        # one batch: the row restrictions index the whole call's rows
        # at the world's decoding temperature, where its failures are as rare as the regime says
        completions = generate(model, tok, texts, max_new_tokens=max_new_tokens, batch_size=len(texts),
                               temperature=world.temperature, progress=False)
    out, start = [], 0
    for prompts, _, topic in groups:
        out.append(steering_metrics(world, prompts, completions[start:start + len(prompts)], model, tok, topic,
                                    per_sample=True))
        start += len(prompts)
    return out


def _run(world, sae, prompts, alphas: dict | None, mode: str, target_topic=None, max_new_tokens: int = 48):
    return run_groups(world, sae, [(prompts, alphas, target_topic)], mode, max_new_tokens)[0]


def other_languages(world, lang: str = "en") -> list[str]:
    """The world's languages but ``lang``, sorted (those of its held-out documents)."""
    return sorted({d.lang for d in world.documents("heldout")} - {lang})


def unwanted_packs(world, lang: str = "en"):
    """The SASFT packs of every language but ``lang``, merged into one pack (features in pack order)."""
    from qscope_rl.world.packs import world_packs

    packs = world_packs(world)
    return [packs[other] for other in other_languages(world, lang) if other in packs]


def code_switch_experiment(world, sae, n_dev: int = 128, n_test: int = 256, top: int = 8, samples: int = 8,
                           log=print) -> dict:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    # each prompt ``samples`` times in one call: its rows draw different random numbers
    dev = world.prompts("train", "en")[:n_dev] * samples
    test = world.prompts("heldout", "en")[:n_test] * samples
    packs = unwanted_packs(world, "en")
    vector = world_language_vector(world, sae.layer, other_languages(world, "en"), "en")

    def alphas(mode, strength):
        if mode == DENSE:
            return dense_strength(strength) * vector
        merged: dict[int, float] = {}
        for pack in packs:
            merged |= alphas_for(pack, mode, strength, top)
        return merged

    def effect(base, m):
        b = base["code_switch_rate"]
        return ((b - m["code_switch_rate"]) / b if b > 0 else float("nan")), m["perplexity"] / base["perplexity"]

    base_dev = _run(world, sae, dev, None, "add")
    chosen, dev_rows = {}, {}
    for mode, strengths in CS_STRENGTHS.items():
        opts = {s: effect(base_dev, _run(world, sae, dev, alphas(mode, s), mode)) for s in strengths}
        log(f"dev sweep {mode}: " + ", ".join(f"{s}: cut {c:.1%} ppl x{r:.2f}" for s, (c, r) in opts.items()))
        chosen[mode] = choose(opts, CS_CAP)
        dev_rows[mode] = opts[chosen[mode]]
    headline = choose(sae_modes(dev_rows), CS_CAP)
    base = _run(world, sae, test, None, "add")
    log(f"unsteered: {round(base_dev['code_switch_rate'] * len(dev))} of {len(dev)} development samples switch, "
        f"{round(base['code_switch_rate'] * len(test))} of {len(test)} held-out ones (the world's lexicon)")
    log(f"{'mode':<12} {'strength':>9} {'dev cut':>8} {'dev ppl x':>9} {'test cs':>8} {'cut':>7} {'95% CI':>15} "
        f"{'ppl':>7} {'ppl x':>6} {'loops':>6} {'dist-2':>6} {'units':>5}")
    log(f"{'unsteered':<12} {'':>9} {'':>8} {'':>9} {base['code_switch_rate']:>8.3f} {'':>7} {'':>15} "
        f"{base['perplexity']:>7.1f} {'':>6} {degeneration(base)}")
    held = {}
    for mode in CS_STRENGTHS:
        m = _run(world, sae, test, alphas(mode, chosen[mode]), mode)
        cut, ratio = effect(base, m)
        # over prompts, each with its `samples` draws: the switches are few, and clustered by prompt
        _, lo, hi = cut_interval(base["switched"], m["switched"], samples)
        held[mode] = {"strength": chosen[mode], "code_switch_rate": m["code_switch_rate"], "reduction": cut,
                      "reduction_ci": [lo, hi],
                      "perplexity": m["perplexity"], "ppl_ratio": ratio, "dev": list(dev_rows[mode]),
                      **{key: m[key] for key in DEGENERATION}}
        log(f"{mode:<12} {str(chosen[mode]):>9} {dev_rows[mode][0]:>8.1%} {dev_rows[mode][1]:>9.2f} "
            f"{m['code_switch_rate']:>8.3f} {cut:>7.1%} {f'[{lo:.1%}, {hi:.1%}]':>15} {m['perplexity']:>7.1f} "
            f"{ratio:>6.2f} {degeneration(m)}")
    return {"unsteered": base, "modes": held, "headline": headline,
            "alphas": {mode: alphas(mode, chosen[mode]) for mode in CS_STRENGTHS}}


def topic_split(world, n_dev: int, n_test: int, rng: random.Random) -> dict:
    """{topic: (development prompts, held-out prompts)}, each drawn from the other topics' prompts."""
    return {t: (rng.sample([p for p in world.prompts("train") if p.topic != t], n_dev),
                rng.sample([p for p in world.prompts("heldout") if p.topic != t], n_test)) for t in world.topics}


def topic_experiment(world, sae, n_dev: int = 24, n_test: int = 64, top: int = 8, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    packs = {t: world_topic_pack(world, sae, t) for t in world.topics}
    vectors = {t: world_topic_vector(world, sae.layer, t) for t in world.topics}

    def alphas(topic, mode, strength):
        return dense_strength(strength) * vectors[topic] if mode == DENSE else alphas_for(packs[topic], mode,
                                                                                          strength, top)

    split = topic_split(world, n_dev, n_test, rng)

    bases = {}
    for which in (0, 1):  # all topics' prompts in one call
        runs = run_groups(world, sae, [(split[t][which], None, t) for t in world.topics], "add")
        bases |= {(which, t): m for t, m in zip(world.topics, runs)}

    def mean_effect(which: int, mode: str | None, strength) -> tuple[float, float, dict]:
        if mode is None:
            runs = [bases[which, t] for t in world.topics]
        else:  # every topic's prompts in one call, each topic's rows steered toward it
            runs = run_groups(world, sae, [(split[t][which], alphas(t, mode, strength), t) for t in world.topics],
                               mode)
        shares = [m["topic_share"] for m in runs]
        ratios = [m["perplexity"] / bases[which, t]["perplexity"] for t, m in zip(world.topics, runs)]
        return sum(shares) / len(shares), sum(ratios) / len(ratios), {"per_topic": shares}

    chosen, dev_rows = {}, {}
    for mode, strengths in TOPIC_STRENGTHS.items():
        opts = {s: mean_effect(0, mode, s)[:2] for s in strengths}
        log(f"dev sweep {mode}: " + ", ".join(f"{s}: share {a:.3f} ppl x{r:.2f}" for s, (a, r) in opts.items()))
        chosen[mode] = choose(opts, TOPIC_CAP)
        dev_rows[mode] = opts[chosen[mode]]
    headline = choose(sae_modes(dev_rows), TOPIC_CAP)
    before = mean_effect(1, None, None)
    log(f"{'mode':<12} {'strength':>9} {'dev share':>9} {'dev ppl x':>9} {'on topic':>8} {'ppl x':>6}")
    log(f"{'unsteered':<12} {'':>9} {'':>9} {'':>9} {before[0]:>8.3f} {1.0:>6.2f}")
    held = {}
    for mode in TOPIC_STRENGTHS:
        share, ratio, extra = mean_effect(1, mode, chosen[mode])
        held[mode] = {"strength": chosen[mode], "topic_share": share, "ppl_ratio": ratio,
                      "dev": list(dev_rows[mode]), **extra}
        log(f"{mode:<12} {str(chosen[mode]):>9} {dev_rows[mode][0]:>9.3f} {dev_rows[mode][1]:>9.2f} "
            f"{share:>8.3f} {ratio:>6.2f}")
    return {"unsteered_share": before[0], "modes": held, "headline": headline}
