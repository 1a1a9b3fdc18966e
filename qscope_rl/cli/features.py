"""``qscope-rl features discover {language,repetition,contrastive}``: find SAE features, save a pack.
``qscope-rl features probe``: fit a linear probe on SAE features (`qscope_rl.features.probe`), check it on held-out
texts.

Without ``--model`` the demo world's model, SAE and training documents are used (``--world``, default
"test"). With ``--model`` (a HF model path or id), ``--sae`` and ``--layer`` are required and texts come
from files: JSONL with a "text" field (and "lang" for language discovery) or plain text, one per line.
Language discovery from your own texts takes either one JSONL with both fields (``--texts mixed.jsonl``, lines
like ``{"text": "The cat sat.", "lang": "en"}``) or one file per language (``--lang-texts en=en.jsonl
--lang-texts zh=zh.txt``: JSONL with "text" or plain lines). ``--dry-run`` checks the model, SAE, layer and
texts without downloading or loading anything big (`discover_check`).
"""

from __future__ import annotations

import random
from pathlib import Path

from .common import add_model_and_sae_args, print_json, read_records
from .errors import check_writable, non_negative_int, positive_int

METHODS = ("language", "repetition", "contrastive")


def register(subparsers) -> None:
    features = subparsers.add_parser("features", help="discover SAE features and save feature packs")
    sub = features.add_subparsers(dest="features_command", metavar="ACTION", required=True)
    discover = sub.add_parser("discover", help="find language / repetition / contrastive features")
    discover.add_argument("method", choices=METHODS)
    _add_source_arguments(discover)
    discover.add_argument("--top-k", type=positive_int, default=16, help="features to keep")
    discover.add_argument("--batch-size", type=positive_int, default=16)
    discover.add_argument("--rank-by", choices=("p_fire", "mean_diff"), default="p_fire", help="contrastive only")
    discover.add_argument("--seed", type=non_negative_int, default=0)
    discover.add_argument("--out", default=None,
                          help="pack JSON to write (language: a folder, one language-<lang>.json per language)")
    discover.add_argument("--json", action="store_true", help="print the pack(s) as JSON instead of a table")
    discover.add_argument("--dry-run", action="store_true",
                          help="check model, SAE, layer and texts (no download, no model load) and print the plan")
    discover.set_defaults(func=_discover)

    probe = sub.add_parser("probe", help="fit a logistic probe on the SAE features of texts' tails, positive vs "
                           "negative, and report its AUROC on held-out texts")
    _add_source_arguments(probe)
    probe.add_argument("--last", type=positive_int, default=24, help="tokens at the end of each text the probe reads")
    probe.add_argument("--holdout", type=float, default=0.2, help="share of each group held out for the AUROC")
    probe.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    probe.add_argument("--batch-size", type=positive_int, default=16)
    probe.add_argument("--seed", type=non_negative_int, default=0)
    probe.add_argument("--out", default=None, help="probe file to write (.safetensors)")
    probe.add_argument("--json", action="store_true", help="print the result as JSON")
    probe.set_defaults(func=_probe, method="contrastive")


def _add_source_arguments(parser) -> None:
    """Where the model, SAE and texts come from: the demo world by default, or --model/--sae/--layer and files."""
    add_model_and_sae_args(parser)
    texts = parser.add_argument_group("texts (default: the world's training documents)")
    texts.add_argument("--texts", default=None,
                       help="language: JSONL with text+lang; repetition: JSONL with text, or plain text lines")
    texts.add_argument("--lang-texts", action="append", default=[], metavar="LANG=FILE",
                       help="language: the texts of one language (JSONL with text, or plain lines); repeat per "
                       "language, instead of --texts")
    texts.add_argument("--positive", default=None, help="contrastive / probe: positive texts (JSONL or lines)")
    texts.add_argument("--negative", default=None, help="contrastive / probe: negative texts (JSONL or lines)")
    texts.add_argument("--target", default="switch",
                       help="contrastive / probe on the world: 'switch', 'loop' (vs clean documents) or a topic name")
    texts.add_argument("--max-texts", type=positive_int, default=2000,
                       help="at most this many texts per group (seeded)")


def read_texts(path: str, with_lang: bool = False) -> list:
    """Texts from JSONL ({"text": ..., "lang": ...}) or plain text (one per line); (text, lang) if with_lang."""
    records = read_records(path)
    if not with_lang:
        return [r["text"] for r in records]
    for n, record in enumerate(records, 1):
        if "lang" not in record:
            raise SystemExit(f"error: {path}: text {n} has no \"lang\" field (language discovery needs JSONL "
                             f"lines with text and lang)")
    return [(r["text"], r["lang"]) for r in records]


def _cap(texts: list[str], n: int, seed: int) -> list[str]:
    return texts if len(texts) <= n else random.Random(seed).sample(texts, n)


def _world_texts(world, args) -> dict:
    docs = world.documents("train")
    clean = [d for d in docs if d.switch_char is None and d.loop_char is None]
    if args.method == "language":
        return {"texts_by_lang": {lang: _cap([d.text for d in clean if d.lang == lang], args.max_texts, args.seed)
                                  for lang in sorted({d.lang for d in docs})}}
    if args.method == "repetition":  # all documents: the loop documents carry the world's own repeats
        return {"texts": _cap([d.text for d in docs], args.max_texts, args.seed)}
    if args.target in ("switch", "loop"):
        attr = f"{args.target}_char"
        positive = [d.text for d in docs if getattr(d, attr) is not None]
        negative = [d.text for d in clean]
    elif args.target in {d.topic for d in docs}:
        positive = [d.text for d in clean if d.topic == args.target]
        negative = [d.text for d in clean if d.topic != args.target]
    else:
        raise SystemExit(f"error: --target {args.target!r} is neither 'switch', 'loop' nor a topic of the world "
                         f"({sorted({d.topic for d in docs})})")
    return {"positive": _cap(positive, args.max_texts, args.seed),
            "negative": _cap(negative, args.max_texts, args.seed), "name": f"contrastive-{args.target}"}


def _texts_by_lang(args) -> dict[str, list[str]]:
    """Language discovery's texts: one JSONL with text and lang (--texts), or one file per language (--lang-texts)."""
    if args.texts and args.lang_texts:
        raise SystemExit("error: give the language texts either as --texts (JSONL with text and lang) or as "
                         "--lang-texts LANG=FILE, not both")
    by_lang: dict[str, list[str]] = {}
    if args.texts:
        for text, lang in read_texts(args.texts, with_lang=True):
            by_lang.setdefault(lang, []).append(text)
    for spec in args.lang_texts:
        lang, sep, path = spec.partition("=")
        if not sep or not lang or not path:
            raise SystemExit(f"error: --lang-texts {spec!r}: expected LANG=FILE, e.g. en=english.jsonl")
        if lang in by_lang:
            raise SystemExit(f"error: --lang-texts names language {lang!r} twice")
        by_lang[lang] = read_texts(path)
    if not by_lang:
        raise SystemExit("error: language discovery with --model needs --texts (JSONL with text and lang) or "
                         "--lang-texts LANG=FILE per language")
    if len(by_lang) < 2:
        raise SystemExit(f"error: language discovery needs texts in at least two languages, got {sorted(by_lang)}")
    return by_lang


def _group_texts(args) -> dict[str, list[str]]:
    """The texts a discovery run reads, by group (language, or texts / positive / negative), before capping."""
    if args.method == "language":
        return _texts_by_lang(args)
    texts = _file_texts(args)
    return {name: texts[name] for name in ("texts", "positive", "negative") if name in texts}


def _file_texts(args) -> dict:
    if args.method == "language":
        by_lang = _texts_by_lang(args)
        return {"texts_by_lang": {lang: _cap(t, args.max_texts, args.seed) for lang, t in by_lang.items()}}
    if args.method == "repetition":
        if not args.texts:
            raise SystemExit("error: repetition discovery with --model needs --texts")
        return {"texts": _cap(read_texts(args.texts), args.max_texts, args.seed)}
    if not (args.positive and args.negative):
        raise SystemExit("error: contrastive discovery and probes on files need both --positive and --negative")
    return {"positive": _cap(read_texts(args.positive), args.max_texts, args.seed),
            "negative": _cap(read_texts(args.negative), args.max_texts, args.seed),
            "name": f"contrastive-{Path(args.positive).stem}"}


def _load(args):
    """(model, tokenizer, sae, texts kwargs, model name)."""
    from qscope_rl.sae.loaders import load_sae

    if args.model is None:
        from qscope_rl.world import load_world

        files = _file_texts(args) if _gives_files(args) else None  # given files beat the world's documents
        world = load_world(args.world)
        sae = load_sae(world.sae_dir, layer=world.layer, device=args.device)
        model = world.model.to(args.device) if args.device else world.model
        return model, world.tokenizer, sae, files or _world_texts(world, args), f"qscope-world-{args.world}"
    if args.sae is None or args.layer is None:
        raise SystemExit("error: --model needs --sae and --layer")
    texts = _file_texts(args)  # read (and checked) before the model loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    if args.device:
        model = model.to(args.device)
    sae = load_sae(args.sae, layer=args.layer, device=args.device)
    return model, tokenizer, sae, texts, args.model


def _gives_files(args) -> bool:
    if args.method in ("language", "repetition"):
        return bool(args.texts)
    return bool(args.positive or args.negative)


def _discover(args) -> int:
    from qscope_rl.features.discovery import (
        discover_contrastive_features,
        discover_language_features,
        discover_repetition_features,
    )

    if args.dry_run:
        from .discover_check import check_discovery

        plan = check_discovery(args, _group_texts)
        print_json(plan)
        return 0 if plan["ok"] else 1
    check_writable(args.out, "--out", folder=args.method == "language")  # before the discovery, not after
    model, tokenizer, sae, texts, model_name = _load(args)
    common = dict(top_k=args.top_k, batch_size=args.batch_size, layer=args.layer if args.model else None,
                  model_name=model_name)
    try:
        if args.method == "language":
            packs = discover_language_features(model, tokenizer, sae, texts["texts_by_lang"], **common)
        elif args.method == "repetition":
            packs = {"repetition": discover_repetition_features(model, tokenizer, sae, texts["texts"],
                                                                seed=args.seed, **common)}
        else:
            packs = {"contrastive": discover_contrastive_features(
                model, tokenizer, sae, texts["positive"], texts["negative"], rank_by=args.rank_by,
                name=texts["name"], **common)}
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if args.out:
        out = Path(args.out)
        for pack in packs.values():
            path = pack.save(out / f"{pack.name}.json" if args.method == "language" else out)
            if not args.json:
                print(f"wrote {path}")
    if args.json:
        print_json({key: pack.to_dict() for key, pack in packs.items()})
        return 0
    for pack in packs.values():
        print_table(pack)
    return 0


def _probe(args) -> int:
    from sklearn.metrics import roc_auc_score

    from qscope_rl.features.probe import fit_completion_probe, score_texts

    if not 0.0 < args.holdout < 1.0:
        raise SystemExit(f"error: --holdout must be in (0, 1), got {args.holdout}")
    check_writable(args.out, "--out")
    model, tokenizer, sae, texts, model_name = _load(args)
    split = {}
    for group in ("positive", "negative"):
        shuffled = random.Random(args.seed).sample(texts[group], len(texts[group]))
        n_held = max(1, round(args.holdout * len(shuffled)))
        if len(shuffled) - n_held < 1:
            raise SystemExit(f"error: {group} texts: {len(shuffled)} are too few to fit on some and hold out others")
        split[group] = (shuffled[n_held:], shuffled[:n_held])
    common = dict(batch_size=args.batch_size)
    try:
        probe = fit_completion_probe(model, tokenizer, sae, split["positive"][0], split["negative"][0],
                                     last=args.last, C=args.C, **common)
        held = split["positive"][1] + split["negative"][1]
        scores = score_texts(model, tokenizer, sae, held, probe, **common)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    labels = [1] * len(split["positive"][1]) + [0] * len(split["negative"][1])
    result = {"model": model_name, "sae": str(sae.source), "layer": sae.layer, "features": probe.features,
              "n_fit": {g: len(split[g][0]) for g in split}, "n_held_out": {g: len(split[g][1]) for g in split},
              "held_out_auroc": float(roc_auc_score(labels, scores.tolist()))}
    if args.out:
        result["path"] = str(probe.save(args.out))
    if args.json:
        print_json(result)
    else:
        fit, held = result["n_fit"], result["n_held_out"]
        print(f"probe on the last {args.last} tokens, fitted on {fit['positive']} positive + {fit['negative']} "
              f"negative texts: AUROC {result['held_out_auroc']:.4f} on {held['positive']} + {held['negative']} "
              "held-out texts" + (f"; wrote {args.out}" if args.out else ""))
    return 0


def print_table(pack) -> None:
    print(f"\n{pack.name} ({pack.method}) on {pack.model}, SAE {pack.sae_source} layer {pack.layer}: "
          f"{len(pack)} features")
    print(f"{'rank':>4} {'id':>7} {'score':>9} {'act+':>8} {'act-':>8} {'fire+':>6} {'fire-':>6} {'mean_pre':>9}")
    for rank, f in enumerate(pack.features, 1):
        s = f.stats
        print(f"{rank:>4} {f.id:>7} {f.score:>9.4f} {s.get('mean_act_pos', 0):>8.4f} {s.get('mean_act_neg', 0):>8.4f} "
              f"{s.get('p_fire_pos', 0):>6.2f} {s.get('p_fire_neg', 0):>6.2f} {s.get('mean_pre', 0):>9.4f}")
