"""``qscope-rl features discover ... --dry-run``: model, SAE, layer and texts checked before anything downloads.

What it reads: the model's ``config.json`` when it is local or already in the Hub cache (hidden size, number of
layers), the SAE's file list and config (local) or the Qwen-Scope releases table (Hub), and the text files. What
it never does: download, load model weights, or encode. Every problem found is listed at once; the exit status is
1 when there is any.
"""

from __future__ import annotations

import json
from pathlib import Path

from qscope_rl.sae.loaders import SAELoadError, load_sae, resolve_hub_sae, sae_source_kind
from qscope_rl.sae.releases import find_release

MIN_TEXTS = 20  # fewer texts per group than this give noisy feature scores: a note, not an error


def check_discovery(args, read_group_texts) -> dict:
    """The plan of a discovery run from a user's own model, SAE and texts; ``problems`` lists what would stop it.

    ``read_group_texts(args)`` reads the texts as the run would (it raises SystemExit on a bad file)."""
    problems, notes = [], []
    if args.model is None:
        return {"model": f"demo world {args.world!r}", "sae": "the world's own", "problems": [],
                "notes": ["no --model: the demo world's model, SAE and documents are used"], "ok": True}
    if args.sae is None or args.layer is None:
        problems.append("--model needs --sae and --layer")
    model = _model(args.model, problems)
    sae = _sae(args, model, problems, notes) if args.sae is not None and args.layer is not None else None
    texts = _texts(args, read_group_texts, problems, notes)
    return {"model": model, "sae": sae, "texts": texts, "problems": problems, "notes": notes, "ok": not problems}


def _model(name: str, problems: list) -> dict:
    path = Path(name).expanduser()
    if path.exists():
        config_file, status = path / "config.json", "local"
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        problems.append(f"--model {name!r}: no such folder, and not a Hub id")
        return {"source": name, "status": "missing"}
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        config_file = Path(cached) if isinstance(cached, str) else None
        status = "in the Hub cache" if config_file else "download at start"
    out = {"source": name, "status": status}
    if config_file is None:
        return out
    if not config_file.is_file():
        problems.append(f"--model {name}: {config_file} does not exist (not a transformers model folder)")
        return out
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        problems.append(f"--model {name}: {config_file} is not valid JSON ({err})")
        return out
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    out.update(hidden_size=config.get("hidden_size"), num_layers=config.get("num_hidden_layers"))
    return out


def _sae(args, model: dict, problems: list, notes: list) -> dict:
    source, layer = args.sae, args.layer
    kind = sae_source_kind(source)
    num_layers, hidden = model.get("num_layers"), model.get("hidden_size")
    if num_layers is not None and not 0 <= layer < num_layers:
        problems.append(f"--layer {layer}: {args.model} has {num_layers} decoder layers (0..{num_layers - 1})")
    if kind == "missing":
        problems.append(f"--sae {source!r}: no such file or folder")
        return {"source": source, "status": "missing"}
    if kind == "local":
        try:
            sae = load_sae(source, layer=layer)  # reads a local file: nothing downloads
        except (SAELoadError, ValueError) as err:
            problems.append(f"--sae {source}: {err}")
            return {"source": source, "status": "local"}
        out = {"source": source, "status": "local", "layer": sae.layer, "d_in": sae.d_in, "d_sae": sae.d_sae,
               "k": sae.k, "architecture": sae.architecture}
        d_in = sae.d_in
    else:
        try:
            hub = resolve_hub_sae(source, layer)
        except (SAELoadError, ValueError) as err:
            problems.append(f"--sae {source} --layer {layer}: {err}")
            return {"source": source, "status": "hub"}
        out = {"source": source, "repo_id": hub.repo_id, "files": list(hub.files), "layer": layer, "k": hub.k,
               "status": "in the Hub cache" if hub.is_cached() else "download at start"}
        d_in = hub.release.d_model if hub.release is not None else None
        if hub.release is not None:
            out.update(release=hub.release.model, d_sae=hub.release.d_sae)
            _check_family(args.model, hub.release, notes)
        else:
            notes.append(f"{hub.repo_id} is not in the Qwen-Scope releases table: its width and layer are checked "
                         f"only once it downloads")
    if d_in is not None and hidden is not None and d_in != hidden:
        problems.append(f"--sae {source} reads d_in={d_in}, but {args.model} has hidden_size={hidden}: it was "
                        f"trained on another model")
    return out


def _check_family(model: str, release, notes: list) -> None:
    try:
        model_release = find_release(model)
    except ValueError:
        notes.append(f"{model} has no Qwen-Scope release of its own: the SAE was trained on {release.model}")
        return
    if model_release.model != release.model:
        notes.append(f"the SAE was trained on {release.model}, but the model is {model} ({model_release.model}'s "
                     f"SAEs fit it)")


def _texts(args, read_group_texts, problems: list, notes: list) -> dict:
    try:
        groups = read_group_texts(args)
    except SystemExit as err:
        problems.append(str(err.code).removeprefix("error: "))
        return {}
    counts = {name: len(texts) for name, texts in groups.items()}
    for name, n in counts.items():
        if n < MIN_TEXTS:
            notes.append(f"{name}: only {n} texts (scores from fewer than {MIN_TEXTS} are noisy)")
    return counts
