"""Does SASFT do what its loss says, and is that what moves code-switching? (issue 16's SFT table)

The main job's SFT table measures no SASFT effect on switching. Two readings are possible: the auxiliary loss does
not get optimised (too weak, wrong tokens), or it does and the features it suppresses are not what makes the
model switch. This tells them apart on the demo world with the demo's own SFT settings (`DemoSettings`, the same
data, packs and seeds as `qscope-rl demo`): for the untrained world model and for each seed's plain-SFT and SASFT
model, SASFT's own term, sum_s ReLU(pre_s(h) - alpha_s) over the unwanted-language pack, per token of held-out
English documents, at four places: clean documents; switched documents before the switch; the last token before
the switch (where the model decides to switch); inside the foreign span. Beside it, each model's held-out switch
rate (the demo's measurement: 256 prompts x 8 samples).

    python benchmarks/sasft_mechanism.py [--world-seed 0] [--seeds 0,1,2] [--docs 200]

The last line is one JSON object: the mean term per place and method, the switch rates, and
`sasft_term_reduction_before_switch` (1 - SASFT / SFT at the last token before a switch) beside
`sasft_switch_ratio` (SASFT / SFT held-out switch rate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PLACES = ("clean", "before_switch", "last_before_switch", "inside_switch")


def place_terms(world, model, aux, docs) -> dict[str, list[float]]:
    """SASFT's per-token term of ``model`` at each of PLACES, over ``docs`` (held-out English documents)."""
    import torch

    from qscope_rl.hooks import capture_residual

    out = {p: [] for p in PLACES}
    for doc in docs:
        enc = world.tokenizer(doc.text, return_offsets_mapping=True)
        with torch.no_grad(), capture_residual(model, world.layer) as cap:
            model(input_ids=torch.tensor([enc["input_ids"]]))
        term = (aux.pre_acts(cap.concatenated()[0]) - aux.alphas).relu().sum(-1).tolist()
        if doc.kind == "normal":
            out["clean"] += term
            continue
        spans = enc["offset_mapping"]
        before = [i for i, (_, end) in enumerate(spans) if end <= doc.switch_char]
        inside = [i for i, (start, end) in enumerate(spans) if start >= doc.switch_char and end <= doc.switch_end]
        out["before_switch"] += [term[i] for i in before]
        out["last_before_switch"] += [term[before[-1]]] if before else []
        out["inside_switch"] += [term[i] for i in inside]
    return out


def main(argv=None) -> dict:
    import torch
    import transformers

    from qscope_rl.world.kernels import portable_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2", help="SFT seeds (the demo's: 0,1,2)")
    parser.add_argument("--docs", type=int, default=200, help="held-out English documents of each kind (at most)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.docs < 1:
        parser.error("--seeds needs at least one seed and --docs must be >= 1")
    os.environ.update(portable_env())  # the demo's kernels (set before the first kernel runs)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    from qscope_rl.demo.main_job import DemoSettings, _measure, prepare
    from qscope_rl.demo.sft import sft_texts, train_sft
    from qscope_rl.features.aux_loss import FeatureAuxLoss
    from qscope_rl.features.feature_pack import FeaturePack
    from qscope_rl.sae.loaders import load_sae
    from qscope_rl.world.sampling import install_cpu_sampler

    install_cpu_sampler()  # as the demo's workers sample
    t0 = time.perf_counter()
    world, packs, settings = prepare(DemoSettings(world_seed=args.world_seed))
    pack = FeaturePack.load(packs["unwanted"])
    aux = FeatureAuxLoss(load_sae(str(world.sae_dir), world.layer), pack.ids, pack.alphas)
    english = [d for d in world.documents("heldout") if d.lang == "en"]
    docs = [d for d in english if d.kind == "normal"][: args.docs] + \
           [d for d in english if d.kind == "switch" and d.switch_char is not None][: args.docs]
    n_switched = sum(d.kind == "switch" for d in docs)
    print(f"world seed {args.world_seed}: {len(docs) - n_switched} clean and {n_switched} switched held-out English "
          f"documents; pack of {len(pack.ids)} unwanted-language features at layer {world.layer}; SFT seeds {seeds}",
          flush=True)

    def row(name, model, seed):
        terms = place_terms(world, model, aux, docs)
        rates = _measure(world, model, settings, seed)["code_switch_rate"]
        r = {p: statistics.fmean(v) if v else float("nan") for p, v in terms.items()}
        r["switch_rate"] = statistics.fmean(rates)
        print(f"{name:>10} seed {seed}: SASFT term per token " + ", ".join(f"{p} {r[p]:.4f}" for p in PLACES)
              + f"; held-out switch rate {r['switch_rate']:.4f}", flush=True)
        return r

    results = {"untrained": [row("untrained", world.model, seeds[0])], "sft": [], "sasft": []}
    for seed in seeds:
        texts = sft_texts(world, settings.sft_docs, seed=world.corpus_spec.seed + 100 + seed)  # the demo's data
        for method in ("sft", "sasft"):
            results[method].append(row(method, train_sft(world, method, seed, texts, packs["unwanted"], settings),
                                       seed))
    mean = {m: {k: statistics.fmean(r[k] for r in rows) for k in (*PLACES, "switch_rate")}
            for m, rows in results.items()}
    out = {f"{m}_{k}": round(v, 5) for m, d in mean.items() for k, v in d.items()}
    out["sasft_term_reduction_before_switch"] = round(1 - mean["sasft"]["last_before_switch"]
                                                      / mean["sft"]["last_before_switch"], 4)
    out["sasft_switch_ratio"] = round(mean["sasft"]["switch_rate"] / mean["sft"]["switch_rate"], 4)
    out |= {"world_seed": args.world_seed, "seeds": seeds, "n_clean_docs": len(docs) - n_switched,
            "n_switched_docs": n_switched, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"SASFT lowers its own term at the last token before a switch by "
          f"{out['sasft_term_reduction_before_switch']:.1%} of plain SFT's; its held-out switch rate is "
          f"{out['sasft_switch_ratio']:.2f}x plain SFT's")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
