"""``--dry-run``: everything a recipe needs, resolved and checked without downloading or training.

The plan says where the model, dataset and SAE come from (local, Hub cache, or "download at start"), checks the
SAE layer against the Qwen-Scope releases table, binds every reward's and callback's settings to its signature,
lists the feature packs and probes (missing ones with the command that makes them) and spells out the batch
arithmetic.
A problem that would stop the run is a `RecipeError` naming the field; missing pack files are listed instead,
so one dry run shows all of them.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from qscope_rl.features.classifier import FeatureClassifier
from qscope_rl.features.feature_pack import FeaturePack
from qscope_rl.features.text_features import sae_fingerprint
from qscope_rl.rewards import resolve_reward_func
from qscope_rl.sae.loaders import SAELoadError, resolve_hub_sae, sae_source_kind
from qscope_rl.sae.releases import find_release

from .dry_run_checks import (
    check_batch_sizes,
    check_model_fits_sae,
    check_pack_content,
    check_resume,
    load_local_sae,
    model_shape,
    offline_downloads,
)
from .recipe import Recipe, RecipeError
from .run_args import RL_TRAINERS, resolve_callback, takes_trainer
from .world_defaults import world_dataset


def plan(recipe: Recipe, processes: int = 1) -> dict:
    """The resolved run as a JSON-able dict; raises `RecipeError` on anything that would stop it."""
    run, config = recipe.run, recipe.config
    check_batch_sizes(recipe)
    model = _model(run.model_name_or_path)
    sae, sae_module = _sae(recipe)
    check_model_fits_sae(recipe, model_shape(run.model_name_or_path), sae)
    packs, missing = _packs(recipe, sae, sae_module)
    probes, missing_probes = _probes(recipe, sae, sae_module)
    dataset, batch = _dataset(recipe), _batch(recipe, processes)
    if "rows" in dataset and config.max_steps > 0:  # how many passes over the data max_steps makes
        seen = batch.get("prompts_seen", config.max_steps * batch["samples_per_optimizer_step"])
        batch["epochs"] = round(seen / max(dataset["rows"], 1), 3)
    result = {
        "recipe": recipe.source,
        "trainer": recipe.trainer,
        "config_class": recipe.config_class.__name__,
        "trainer_class": recipe.trainer_class.__name__,
        "demo_world": str(recipe.world.path) if recipe.world is not None else None,
        "model": model,
        "dataset": dataset,
        "sae": sae,
        "packs": packs,
        "probes": probes,
        "rewards": _rewards(recipe) if recipe.trainer in RL_TRAINERS else [],
        "callbacks": _callbacks(recipe),
        "peft": {"r": run.lora_r, "alpha": run.lora_alpha, "dropout": run.lora_dropout,
                 "target_modules": run.lora_target_modules or "all-linear"} if run.use_peft else None,
        "batch": batch,
        "output_dir": config.output_dir,
        "resume_from": check_resume(recipe),
        "report_to": _report_to(config),
        "missing_files": missing + missing_probes,
        "notes": list(recipe.notes),
    }
    result["offline_downloads"] = offline_downloads(result)  # HF_HUB_OFFLINE set, not cached: the run would fail
    return result


def _hub_status(repo_id: str, filename: str, repo_type: str = "model") -> str:
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
    return "in the Hub cache" if cached else "download at start"


def _model(name: str | None) -> dict:
    if name is None:
        raise RecipeError("model_name_or_path is not set (or set demo_world)")
    if Path(name).expanduser().exists():
        return {"source": name, "status": "local"}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RecipeError(f"model_name_or_path={name!r}: no such folder, and not a Hub id")
    return {"source": name, "status": _hub_status(name, "config.json")}


def _dataset(recipe: Recipe) -> dict:
    run = recipe.run
    if run.dataset_name is None:
        if recipe.world is None:
            raise RecipeError("dataset_name is not set (or set demo_world)")
        data = world_dataset(recipe.world, recipe.trainer, run.demo_world_lang)
        return {"source": f"demo world {recipe.world.path.name}", "status": "local", "rows": len(data),
                "columns": data.column_names, "lang": run.demo_world_lang}
    name = run.dataset_name
    if Path(name).expanduser().exists():
        status = "local"
    elif name.startswith((".", "/", "~")) or Path(name).suffix in (".json", ".jsonl", ".csv", ".parquet"):
        raise RecipeError(f"dataset_name={name!r}: no such file")
    else:
        status = "download at start"
    out = {"source": name, "config": run.dataset_config, "split": run.dataset_split, "status": status}
    if recipe.trainer in RL_TRAINERS:
        out.update(prompt_column=run.dataset_prompt_column, prompt_format=run.prompt_format)
    return out


def _sae(recipe: Recipe) -> tuple[dict | None, object]:
    """The SAE's plan entry, and the SAE itself when it is local (loaded: a corrupt file fails the dry run)."""
    config = recipe.config
    if config.sae_source is None:
        return None, None
    source, layer = str(config.sae_source), config.sae_layer
    kind = sae_source_kind(source)
    if kind == "missing":
        raise RecipeError(f"sae_source={source!r}: no such file or folder")
    if kind == "local":
        folder = Path(source).expanduser()
        layers = sorted(int(p.name[5:-7]) for p in folder.glob("layer*.sae.pt")) if folder.is_dir() else []
        if layers and layer is not None and layer not in layers:
            named = f"sae_layer={layer}" + (f" (sae_id={config.sae_id!r})" if config.sae_id else "")
            raise RecipeError(f"{named}: {source} holds SAEs for layers {layers}")
        sae = load_local_sae(recipe)
        return {"source": source, "layer": layer if layer is not None else sae.layer, "status": "local",
                "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k}, sae
    try:
        hub = resolve_hub_sae(source, layer, config.sae_k, sae_id=config.sae_id)
    except (SAELoadError, ValueError) as err:
        raise RecipeError(f"sae_source={source!r}, sae_layer={layer}: {err}") from err
    out = {"source": source, "layer": layer, "repo_id": hub.repo_id, "file": hub.filename, "k": hub.k,
           "status": "in the Hub cache" if hub.is_cached() else "download at start"}
    if hub.release is not None:
        out.update(release=hub.release.model, num_layers=hub.release.num_layers, d_model=hub.release.d_model,
                   d_sae=hub.release.d_sae)
        model_release = _release_of(recipe.run.model_name_or_path)
        if model_release is not None and model_release.model != hub.release.model:
            recipe.notes.append(f"the SAE {hub.repo_id} was trained on {hub.release.model}, but the model is "
                                f"{recipe.run.model_name_or_path} ({model_release.model}'s SAEs fit it)")
    else:
        recipe.notes.append(f"{hub.repo_id} is not in the Qwen-Scope releases table: layer {layer} is checked "
                            f"only when the file downloads")
    return out, None


def _release_of(model: str | None):
    try:
        return find_release(model) if model else None
    except ValueError:
        return None


def _pack_settings(recipe: Recipe) -> list[tuple[str, str]]:
    """(where, path) of every pack the run reads: config fields and reward / callback settings ending in 'pack'."""
    config, run = recipe.config, recipe.run
    found = [(name, getattr(config, name)) for name in sorted(vars(config))
             if name.endswith("_pack") and getattr(config, name) is not None]
    for group, settings in (("reward_kwargs", run.reward_kwargs), ("callback_kwargs", run.callback_kwargs)):
        for owner, kwargs in settings.items():
            found += [(f"{group}.{owner}.{k}", v) for k, v in kwargs.items() if k.endswith("pack") and
                      isinstance(v, str)]
    return found


def _packs(recipe: Recipe, sae: dict | None, sae_module=None) -> tuple[dict, list[dict]]:
    packs, missing = {}, {}
    layer = getattr(recipe.config, "sae_layer", None)
    for where, path in _pack_settings(recipe):
        if not Path(path).is_file():
            entry = missing.setdefault(path, {"path": path, "fields": [],
                                              "create_with": discover_command(recipe, path)})
            entry["fields"].append(where)
            continue
        try:
            pack = FeaturePack.load(path)
        except ValueError as err:
            raise RecipeError(f"{where}={path!r}: {err}") from err
        _check_fits_sae(where, path, "was found on", pack.layer, pack.d_sae, layer, sae)
        check_pack_content(recipe, where, path, pack, sae_module)
        packs[where] = {"path": path, "name": pack.name, "features": len(pack), "layer": pack.layer,
                        "sae_source": pack.sae_source}
    return packs, list(missing.values())


def _check_fits_sae(where: str, path: str, verb: str, file_layer, file_d_sae, layer, sae: dict | None) -> None:
    """A pack or probe file made for another layer or another SAE width is a `RecipeError` naming the field."""
    if layer is not None and file_layer not in (None, layer):
        raise RecipeError(f"{where}={path!r} {verb} layer {file_layer}, but sae_layer={layer}")
    if sae is not None and sae.get("d_sae") not in (None, file_d_sae):
        raise RecipeError(f"{where}={path!r} {verb} an SAE with d_sae={file_d_sae}, but "
                          f"{sae.get('repo_id', sae['source'])} has d_sae={sae['d_sae']}")


def _probes(recipe: Recipe, sae: dict | None, sae_module=None) -> tuple[dict, list[dict]]:
    """The completion probes the run reads (config fields ending in '_probe', reward settings named 'probe'),
    loaded and checked against the SAE like the packs; missing ones come with the command that fits one."""
    config, run = recipe.config, recipe.run
    found = [(name, getattr(config, name)) for name in sorted(vars(config))
             if name.endswith("_probe") and isinstance(getattr(config, name), str)]
    found += [(f"reward_kwargs.{owner}.probe", kwargs["probe"]) for owner, kwargs in run.reward_kwargs.items()
              if isinstance(kwargs.get("probe"), str)]
    probes, missing = {}, []
    source = f"--model {run.model_name_or_path} --sae {config.sae_source} --layer {config.sae_layer}"
    for where, path in found:
        if not Path(path).is_file():
            missing.append({"path": path, "fields": [where], "create_with": f"qscope-rl features probe {source} "
                            f"--positive <positive.jsonl> --negative <negative.jsonl> --out {path}"})
            continue
        try:
            probe = FeatureClassifier.load(path)
        except ValueError as err:
            raise RecipeError(f"{where}={path!r}: {err}") from err
        _check_fits_sae(where, path, "was fitted on", probe.sae.get("layer"), probe.sae.get("d_sae"),
                        getattr(config, "sae_layer", None), sae)
        if sae_module is not None and probe.sae.get("fingerprint") not in (None, sae_fingerprint(sae_module)):
            raise RecipeError(f"{where}={path!r} was fitted on another SAE of the same shape (digest "
                              f"{probe.sae['fingerprint']} != {sae_fingerprint(sae_module)}); fit it again")
        probes[where] = {"path": path, "features": probe.features, "classes": probe.classes,
                         "layer": probe.sae.get("layer"), "sae_source": probe.sae.get("source")}
    return probes, missing


def discover_command(recipe: Recipe, path: str) -> str:
    """The ``qscope-rl features discover`` command that writes a missing pack (texts are yours to give)."""
    config = recipe.config
    source = f"--model {recipe.run.model_name_or_path} --sae {config.sae_source} --layer {config.sae_layer}"
    stem = Path(path).stem
    if stem.startswith("language-"):
        return (f"qscope-rl features discover language {source} --texts <texts.jsonl with text and lang, "
                f"both languages> --out {Path(path).parent}/  # writes language-<lang>.json per language")
    if "repetition" in stem:
        return f"qscope-rl features discover repetition {source} --texts <texts.jsonl> --out {path}"
    return (f"qscope-rl features discover contrastive {source} --positive <positive.jsonl> "
            f"--negative <negative.jsonl> --out {path}")


def _bound(kind: str, name: str, obj, kwargs: dict, placeholder_first: bool = False) -> dict:
    where = f"{kind}_kwargs.{name}"
    if not isinstance(obj, type):
        if kwargs:
            raise RecipeError(f"{where}: {name!r} is a function, it takes no settings (got {sorted(kwargs)})")
        return {"name": name, "object": _qualname(obj), "kwargs": {}}
    try:
        inspect.signature(obj).bind(*([None] if placeholder_first else []), **kwargs)
    except TypeError as err:
        raise RecipeError(f"{where}={kwargs}: {err} (signature {obj.__name__}{inspect.signature(obj)})") from err
    return {"name": name, "object": _qualname(obj), "kwargs": kwargs}


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _rewards(recipe: Recipe) -> list[dict]:
    run, config = recipe.run, recipe.config
    if not run.reward_funcs:
        raise RecipeError(f"reward_funcs is empty: the {recipe.trainer} trainer needs at least one reward")
    weights = config.reward_weights
    if weights is not None and len(weights) != len(run.reward_funcs):
        raise RecipeError(f"reward_weights={weights} has {len(weights)} weights for {len(run.reward_funcs)} "
                          f"reward_funcs {run.reward_funcs}")
    out = []
    for i, name in enumerate(run.reward_funcs):
        try:
            obj = resolve_reward_func(name)
        except ValueError as err:
            raise RecipeError(f"reward_funcs: {err}") from err
        entry = _bound("reward", name, obj, run.reward_kwargs.get(name, {}))
        entry["weight"] = 1.0 if weights is None else weights[i]
        out.append(entry)
    return out


def _callbacks(recipe: Recipe) -> list[dict]:
    out = []
    for name in recipe.run.callbacks:
        try:
            cls = resolve_callback(name)
        except ValueError as err:
            raise RecipeError(f"callbacks: {err}") from err
        out.append(_bound("callback", name, cls, recipe.run.callback_kwargs.get(name, {}), takes_trainer(cls)))
    return out


def _batch(recipe: Recipe, processes: int) -> dict:
    """Per-device batch x gradient accumulation x processes; RL: prompts = completions / num_generations."""
    config, given = recipe.config, recipe.given
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    out = {"processes": processes, "per_device_train_batch_size": per_device,
           "gradient_accumulation_steps": accumulation,
           "samples_per_optimizer_step": per_device * accumulation * processes, "max_steps": config.max_steps}
    if recipe.trainer not in RL_TRAINERS:
        return out
    n, global_batch = config.num_generations, per_device * processes
    if given.get("generation_batch_size") is not None:
        generation_batch = given["generation_batch_size"]
        if generation_batch % global_batch:
            raise RecipeError(f"generation_batch_size={generation_batch} is not a multiple of "
                              f"per_device_train_batch_size x processes = {per_device} x {processes}")
        steps_per_generation = generation_batch // global_batch
    else:
        steps_per_generation = given.get("steps_per_generation") or accumulation
        generation_batch = global_batch * steps_per_generation
    if generation_batch % n:
        raise RecipeError(f"num_generations={n} does not divide the generation batch per_device_train_batch_size x "
                          f"processes x steps_per_generation = {per_device} x {processes} x {steps_per_generation} "
                          f"= {generation_batch}")
    completions = per_device * accumulation * processes
    out.update(num_generations=n, generation_batch_size=generation_batch, steps_per_generation=steps_per_generation,
               prompts_per_generation=generation_batch // n, completions_per_optimizer_step=completions,
               prompts_per_optimizer_step=completions / n)
    if config.max_steps > 0:
        out["prompts_seen"] = int(config.max_steps * completions / n)
    return out


def _report_to(config) -> list[str]:
    report_to = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise RecipeError("report_to names wandb, which is not installed: pip install 'qscope-rl[wandb]'")
    return report_to


def format_plan(p: dict) -> str:
    """The plan as a short readable report."""
    lines = [f"recipe   {p['recipe']}  ({p['trainer']}: {p['trainer_class']} with {p['config_class']})"]
    if p["demo_world"]:
        lines.append(f"world    {p['demo_world']}")
    lines.append(f"model    {p['model']['source']}  [{p['model']['status']}]")
    d = p["dataset"]
    lines.append(f"dataset  {d['source']}  [{d['status']}]" + (f"  {d['rows']} rows" if "rows" in d else ""))
    sae = p["sae"]
    if sae is None:
        lines.append("sae      none (plain TRL trainer)")
    else:
        where = f"{sae['repo_id']}/{sae['file']}" if "repo_id" in sae else sae["source"]
        lines.append(f"sae      {where}  layer {sae['layer']}  [{sae['status']}]")
    for where, pack in p["packs"].items():
        lines.append(f"pack     {where}: {pack['path']}  ({pack['features']} features, layer {pack['layer']})")
    for r in p["rewards"]:
        lines.append(f"reward   {r['name']}  weight {r['weight']}  {r['kwargs'] or ''}".rstrip())
    for c in p["callbacks"]:
        lines.append(f"callback {c['name']}  {sorted(c['kwargs'])}")
    if p["peft"]:
        lines.append(f"peft     LoRA {p['peft']}")
    b = p["batch"]
    unit = "completions" if "num_generations" in b else "sequences"
    arithmetic = (f"batch    {b['per_device_train_batch_size']} {unit} per device x {b['gradient_accumulation_steps']} "
                  f"accumulation x {b['processes']} processes = {b['samples_per_optimizer_step']} {unit} per "
                  f"optimizer step")
    if "num_generations" in b:
        arithmetic += (f" = {b['prompts_per_optimizer_step']:g} prompts x {b['num_generations']} generations; "
                       f"generated {b['generation_batch_size']} at a time, every {b['steps_per_generation']} "
                       f"micro-step(s)")
    if "epochs" in b:
        arithmetic += f"; {b['max_steps']} steps = {b['epochs']:g} epochs"
    lines.append(arithmetic)
    lines.append(f"output   {p['output_dir']}  report_to {', '.join(p['report_to']) or 'none'}")
    for m in p["missing_files"]:
        lines.append(f"MISSING  {m['path']} ({', '.join(m['fields'])})\n         make it with: {m['create_with']}")
    lines += [f"note     {n}" for n in p["notes"]]
    for d in p.get("offline_downloads", []):
        lines.append(f"OFFLINE  HF_HUB_OFFLINE is set and the {d['what']} {d['repo']} is not in the Hub cache: the "
                     f"run would fail\n         pre-download it where there is network: {d['command']}")
    return "\n".join(lines)
