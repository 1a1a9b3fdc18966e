"""SAE detection of code-switching and repetition on the demo world's own samples, against the judges.

Features are discovered on the world's TRAINING documents: language features on clean ones by the
monolinguality score, repetition features on all of them by the first-vs-last-occurrence contrast of
their own repeated token n-grams (the loop documents supply those). Evaluation is on completions
the world model samples for HELD-OUT prompts in both languages, laid out as TRL lays them out (prompts
left-padded, completions right-padded), re-run through the model and encoded with `encode_completions` on
their text tokens (the closing EOS left out, as the SAE trainers do). Labels come from the independent judges
(`qscope_rl.judges`), untouched:

- code-switching: `script_code_switch(text, prompt language)`; lingua's foreign share is scored beside.
- onset: the first switched token is the first completion token carrying a byte of the first
  foreign-script character; the SAE's onset is the first token whose unwanted-language score exceeds a
  threshold calibrated on clean TRAINING documents (0.1% of their tokens flagged); `> 0` is shown beside.
- repetition: `has_loop(text)`, scored by a linear probe on SAE features (`qscope_rl.features.probe`: logistic
  regression on the mean activation of every feature over a completion's last 24 tokens, fitted on looping vs
  loop-free TRAINING documents) and by the Qwen-Scope repetition pack (mean of its features over the
  completion); the open-r1 n-gram repeat ratio is scored beside.
- cost: `encode_completions` + the three scorers (what a trainer runs per step) vs `sae.encode_sparse` on the
  same real completion tokens, alternated, best of `--repeats`, on 1 thread (the JSON) and on all threads.

    python benchmarks/detection.py [--world test] [--samples-per-prompt 2] [--max-new-tokens 64]

The last line is one JSON object: cs_auroc_sae, cs_auroc_lingua, onset_at_or_before, rep_auroc_sae (the probe),
rep_auroc_sae_pack, rep_auroc_ngram, detect_cost_ratio (targets: >= 0.97, -, >= 0.8, >= 0.95, -, -, <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import replace

import torch
from sklearn.metrics import roc_auc_score

from qscope_rl import SparseAutoencoder, capture_residual, load_sae
from qscope_rl.features.classifier import sae_info
from qscope_rl.features.detection import calibrate_threshold, code_switch_scores, encode_completions, repetition_scores
from qscope_rl.features.discovery import discover_language_features, discover_repetition_features
from qscope_rl.features.probe import fit_completion_probe, probe_scores
from qscope_rl.judges import first_switch_offset, has_loop, lingua_foreign_share, ngram_repeat_ratio
from qscope_rl.tools.steered_generation import sampling_kwargs
from qscope_rl.world import World, load_world

OTHER = {"en": "zh", "zh": "en"}


def discover(world, sae, args):
    docs = world.documents("train")
    clean = [d for d in docs if d.switch_char is None and d.loop_char is None]
    by_lang = {lang: [d.text for d in clean if d.lang == lang][: args.discovery_texts] for lang in ("en", "zh")}
    packs = discover_language_features(world.model, world.tokenizer, sae, by_lang, top_k=args.top_k,
                                       batch_size=32)
    # all training documents: their own repeated n-grams (source="auto" finds those in the loop documents)
    rep = discover_repetition_features(world.model, world.tokenizer, sae, [d.text for d in docs], top_k=args.top_k,
                                       batch_size=32)
    # the probe: looping vs loop-free training documents (the corpus labels its loops)
    rng = random.Random(0)
    looping = [d.text for d in docs if d.loop_char is not None]
    loop_free = [d.text for d in docs if d.loop_char is None]
    probe = fit_completion_probe(world.model, world.tokenizer, sae, rng.sample(looping, args.probe_texts),
                                 rng.sample(loop_free, args.probe_texts), last=args.probe_last)
    return packs, rep, probe


@torch.no_grad()
def calibrate(world, sae, packs, tracked, args):
    """Per-token thresholds (activation, pre-activation) at which clean TRAINING text of each language
    is flagged on 0.1% of its tokens, for the unwanted language's pack."""
    clean = [d for d in world.documents("train") if d.switch_char is None and d.loop_char is None]
    thresholds = {}
    for lang in ("en", "zh"):
        texts = [d.text for d in clean if d.lang == lang][: args.calibration_texts]
        enc = world.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        with capture_residual(world.model, sae.layer) as cap:
            world.model(**enc)
        acts = encode_completions(sae, cap.last, enc["attention_mask"].bool(), tracked_ids=tracked)
        thresholds[lang] = tuple(calibrate_threshold(acts, packs[OTHER[lang]], quantile=0.999, use_pre=pre)
                                 for pre in (False, True))
    return thresholds


@torch.no_grad()
def rollouts(world, prompts, args, seed):
    """TRL-layout batches: (prompt_ids, prompt_mask, completion_ids, completion_mask), sampled like world.sample."""
    tok, model = world.tokenizer, world.model
    eos = tok.eos_token_id
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), args.batch_size):
            enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)  # left padding
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, **sampling_kwargs(args.temperature),
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
            completion = gen[:, enc["input_ids"].shape[1]:]
            is_eos = completion == eos
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
            # the text tokens: the closing EOS is left out of detection, as the SAE trainers do (its residual
            # lights up language features on most clean completions)
            mask = torch.arange(completion.shape[1])[None] < first_eos[:, None]
            out.append((enc["input_ids"], enc["attention_mask"], completion, mask))
    return out


def first_switched_token(tok, ids: list[int], text: str, target: str) -> int | None:
    """Index of the first token carrying a byte of the first foreign-script character of `text`."""
    offset = first_switch_offset(text, target)
    if offset is None:
        return None
    for j in range(len(ids)):
        # a partial UTF-8 character decodes to U+FFFD, so the prefix grows past `offset` at its first byte
        if len(tok.decode(ids[:j + 1], skip_special_tokens=True)) > offset:
            return j
    return len(ids) - 1


def auroc(labels, scores) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="default", help="demo world size: default or test")
    parser.add_argument("--world-dir", default=None, help="a built world folder (instead of --world)")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16, help="features per pack")
    parser.add_argument("--discovery-texts", type=int, default=1000, help="training documents per language")
    parser.add_argument("--calibration-texts", type=int, default=300, help="clean training documents per language")
    parser.add_argument("--probe-texts", type=int, default=600, help="training documents per class for the probe")
    parser.add_argument("--probe-last", type=int, default=24, help="tokens at a completion's end the probe reads")
    parser.add_argument("--repeats", type=int, default=15, help="timing repeats")
    args = parser.parse_args()

    world = World(args.world_dir) if args.world_dir else load_world(args.world)
    sae = load_sae(world.sae_dir, layer=world.layer)
    packs, rep_pack, probe = discover(world, sae, args)
    tracked = torch.unique(torch.cat([p.ids for p in packs.values()]))
    thresholds = calibrate(world, sae, packs, tracked, args)
    print(f"world {args.world_dir or args.world!r}: SAE d_in={sae.d_in} d_sae={sae.d_sae} k={sae.k} layer={sae.layer}; "
          f"packs: en {packs['en'].ids.tolist()[:6]}..., zh {packs['zh'].ids.tolist()[:6]}..., "
          f"repetition {rep_pack.ids.tolist()[:6]}... ({rep_pack.data['n_natural']} training documents with "
          f"repeats); onset thresholds (activation, pre-activation) calibrated "
          f"on clean training text: " + ", ".join(f"{k} {a:.3f}, {p:.3f}" for k, (a, p) in thresholds.items()))

    rows = []  # one dict per completion
    timed = []  # (hidden, mask, row packs) per batch, for the cost measurement
    for lang in ("en", "zh"):
        prompts = [p.text for p in world.prompts("heldout", lang)]
        for s in range(args.samples_per_prompt):
            for prompt_ids, prompt_mask, completion_ids, mask in rollouts(world, prompts, args, seed=1000 * s + 1):
                with torch.no_grad(), capture_residual(world.model, sae.layer) as cap:
                    world.model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                                attention_mask=torch.cat([prompt_mask, mask.long()], 1))
                hidden = cap.last  # (B, P + T, d)
                unwanted = [packs[OTHER[lang]]] * len(mask)
                acts = encode_completions(sae, hidden, mask, prompt_length=prompt_ids.shape[1], tracked_ids=tracked)
                cs = code_switch_scores(acts, unwanted)
                cs_cal = code_switch_scores(acts, unwanted, threshold=thresholds[lang][0])
                cs_pre = code_switch_scores(acts, unwanted, use_pre=True, threshold=thresholds[lang][1])
                rep = repetition_scores(acts, rep_pack)
                rep_probe = probe_scores(acts, probe)
                timed.append((hidden, prompt_ids.shape[1], mask, unwanted))
                for i in range(len(mask)):
                    ids = completion_ids[i][mask[i]].tolist()
                    text = world.tokenizer.decode(ids, skip_special_tokens=True)
                    rows.append(dict(lang=lang, text=text, cs=cs.per_completion[i].item(),
                                     onset0=cs.onset[i].item(), onset=cs_cal.onset[i].item(),
                                     onset_pre=cs_pre.onset[i].item(),
                                     rep=rep.per_completion[i].item(), rep_probe=rep_probe[i].item(),
                                     switch_token=first_switched_token(world.tokenizer, ids, text, lang)))

    switched = [r["switch_token"] is not None for r in rows]
    looped = [has_loop(r["text"]) for r in rows]
    n = len(rows)
    print(f"\n{n} held-out completions ({args.samples_per_prompt} per prompt, {args.max_new_tokens} new tokens): "
          f"{sum(switched)} code-switched (script judge), {sum(looped)} looping (loop detector)")

    cs_sae = auroc(switched, [r["cs"] for r in rows])
    cs_lingua = auroc(switched, [lingua_foreign_share(r["text"], r["lang"]) for r in rows])
    print(f"\ncode-switch AUROC: SAE {cs_sae:.4f}   lingua foreign share {cs_lingua:.4f}")
    for lang in ("en", "zh"):
        sub = [i for i in range(n) if rows[i]["lang"] == lang]
        print(f"  {lang} prompts: SAE {auroc([switched[i] for i in sub], [rows[i]['cs'] for i in sub]):.4f} "
              f"({sum(switched[i] for i in sub)}/{len(sub)} switched)")

    leads = {}
    names = {"onset0": "activation > 0", "onset": "activation > calibrated threshold",
             "onset_pre": "pre-activation > calibrated threshold"}
    for key in ("onset0", "onset", "onset_pre"):
        lead = [r["switch_token"] - r[key] if r[key] >= 0 else None for r in rows if r["switch_token"] is not None]
        leads[key] = lead
        hit = sum(x is not None and x >= 0 for x in lead) / max(len(lead), 1)
        within = sum(x is not None and 0 <= x <= 2 for x in lead) / max(len(lead), 1)
        dist = Counter("missed" if x is None else max(min(x, 10), -10) for x in lead)
        label = names[key]
        print(f"\nonset by {label}: at or before the first switched token in {hit:.1%} "
              f"({within:.1%} 0-2 tokens early); lead in tokens (+ early, - late, clipped at +-10):")
        print("  " + ", ".join(f"{k}: {dist[k]}" for k in sorted(dist, key=lambda k: (k == "missed", k))))
        clean_flagged = sum(r[key] >= 0 for r, s in zip(rows, switched) if not s) / max(n - sum(switched), 1)
        print(f"  completions without a switch that are flagged somewhere: {clean_flagged:.1%}")

    rep_sae = auroc(looped, [r["rep_probe"] for r in rows])
    rep_pack_auroc = auroc(looped, [r["rep"] for r in rows])
    rep_ngram = auroc(looped, [ngram_repeat_ratio(r["text"]) for r in rows])
    print(f"\nrepetition AUROC: SAE probe (last {args.probe_last} tokens, {2 * args.probe_texts} training documents) "
          f"{rep_sae:.4f}   SAE repetition pack {rep_pack_auroc:.4f}   n-gram repeat ratio {rep_ngram:.4f}")

    ratio, t_detect, t_encode, tokens = detect_cost(sae, timed, tracked, rep_pack, probe, args.repeats, threads=1)
    print(f"\ncost over {tokens} completion tokens, 1 thread, best of {args.repeats}: encode_sparse "
          f"{t_encode * 1e3:.1f} ms, detection (encode_completions + code_switch_scores + repetition_scores + "
          f"probe_scores) {t_detect * 1e3:.1f} ms, ratio {ratio:.3f}")
    ratio_mt, t_detect, t_encode, _ = detect_cost(sae, timed, tracked, rep_pack, probe, args.repeats,
                                                  threads=torch.get_num_threads())
    print(f"  with {torch.get_num_threads()} threads (noisy on a shared machine): encode_sparse "
          f"{t_encode * 1e3:.1f} ms, detection {t_detect * 1e3:.1f} ms, ratio {ratio_mt:.3f}")
    ratio_wide, t_detect, t_encode, tokens = cost_at_qwen_scope_size(timed[0], packs, rep_pack, tracked, probe)
    print(f"  the same detection with a random SAE of Qwen-Scope's size (d_in 2048, d_sae 32768, k 50) on one batch "
          f"({tokens} tokens, 1 thread, best of 3): encode_sparse {t_encode * 1e3:.0f} ms, detection "
          f"{t_detect * 1e3:.0f} ms, ratio {ratio_wide:.3f}")
    onset_at_or_before = sum(x is not None and x >= 0 for x in leads["onset"]) / max(len(leads["onset"]), 1)
    print(json.dumps(dict(cs_auroc_sae=round(cs_sae, 4), cs_auroc_lingua=round(cs_lingua, 4),
                          onset_at_or_before=round(onset_at_or_before, 4), rep_auroc_sae=round(rep_sae, 4),
                          rep_auroc_sae_pack=round(rep_pack_auroc, 4), rep_auroc_ngram=round(rep_ngram, 4),
                          detect_cost_ratio=round(ratio, 4), detect_cost_ratio_qwen_scope_size=round(ratio_wide, 4),
                          n_completions=n, n_switched=sum(switched), n_looped=sum(looped))))


@torch.no_grad()
def detect_cost(sae, timed, tracked, rep_pack, probe, repeats, threads):
    """Best-of-`repeats` wall time of a trainer's detection vs the bare sparse encode of the same tokens."""
    flats = [hidden[:, p:][mask] for hidden, p, mask, _ in timed]

    def encode():
        for flat in flats:
            sae.encode_sparse(flat)

    def detect():
        for hidden, p, mask, unwanted in timed:
            acts = encode_completions(sae, hidden, mask, prompt_length=p, tracked_ids=tracked)
            code_switch_scores(acts, unwanted)
            repetition_scores(acts, rep_pack)
            probe_scores(acts, probe)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = {"encode": float("inf"), "detect": float("inf")}
    try:
        for _ in range(repeats):
            for name, fn in (("encode", encode), ("detect", detect)):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return best["detect"] / best["encode"], best["detect"], best["encode"], sum(len(f) for f in flats)


@torch.no_grad()
def cost_at_qwen_scope_size(batch, packs, rep_pack, tracked, probe):
    """`detect_cost` for one batch's layout with a random SAE of Qwen3-1.7B's Qwen-Scope size and random residuals:
    the per-token detection work is the same, the encode it is compared with is ~500x larger."""
    hidden, p, mask, unwanted = batch
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 2048, 32768
    sae = SparseAutoencoder.from_weights({"W_enc": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
                                          "b_enc": torch.zeros(d_sae), "W_dec": torch.randn(d_in, d_sae, generator=g),
                                          "b_dec": torch.zeros(d_in)}, architecture="topk", k=50, layer=0)
    widen = lambda pack: replace(pack, d_sae=d_sae, d_in=d_in)  # noqa: E731, the same feature ids
    wide_probe = replace(probe, sae=sae_info(sae), tensors={
        "coef": torch.randn(len(probe.classes), d_sae, generator=g), "intercept": torch.zeros(len(probe.classes)),
        "mean": torch.zeros(d_sae), "scale": torch.ones(d_sae)})
    wide = (torch.randn(*hidden.shape[:2], d_in, generator=g), p, mask, [widen(unwanted[0])] * len(mask))
    return detect_cost(sae, [wide], tracked, widen(rep_pack), wide_probe, repeats=3, threads=1)


if __name__ == "__main__":
    main()
