"""Recipes: every YAML parses and dry-runs, bad keys and values are errors that name them, `qscope-rl train` trains
every demo recipe on the test world, and the CPU accelerate config really trains with 2 processes."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qscope_rl.cli import build_parser
from qscope_rl.cli import main as cli_main
from qscope_rl.trainers.launch import launcher as launch
from qscope_rl.trainers.launch.dry_run import plan
from qscope_rl.trainers.launch.recipe import RecipeError, parse_recipe
from qscope_rl.trainers.launch.run_args import RL_TRAINERS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DEMO = sorted(RECIPES.glob("*.yaml"))
QWEN3 = sorted((RECIPES / "qwen3").glob("*.yaml"))
REAL = RECIPES / "qwen3" / "grpo_code_switch.yaml"  # the base of the error cases: needs no world


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def short_run(trainer: str, out) -> list[str]:
    """Overrides that make a demo recipe train 2 tiny steps."""
    common = ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
              "--disable_tqdm", "true", "--output_dir", str(out)]
    if trainer == "sft":
        return common + ["--max_length", "48"]
    return common + ["--num_generations", "4", "--max_completion_length", "8"]


def trainer_of(path: Path) -> str:
    return yaml.safe_load(path.read_text())["trainer"]


def test_recipe_files_are_all_there():
    assert [p.name for p in DEMO] == ["grpo_amplified_repetition.yaml", "grpo_code_switch.yaml",
                                      "rloo_code_switch.yaml", "sasft.yaml"]
    assert len(QWEN3) == 4
    assert {p.stem for p in (RECIPES / "accelerate_configs").glob("*.yaml")} == \
        {"cpu", "single_gpu", "ddp", "zero2", "zero3", "multinode"}


@pytest.mark.parametrize("path", DEMO, ids=lambda p: p.stem)
def test_demo_recipes_dry_run_with_no_missing_files(path, world, pack_files, tmp_path):
    recipe = parse_recipe(str(path), ["--demo_world", str(world.path), "--output_dir", str(tmp_path)],
                          dry_run=True)
    result = plan(recipe, processes=2)
    json.dumps(result)  # --json prints it
    assert result["missing_files"] == []
    assert result["model"] == {"source": str(world.model_dir), "status": "local"}
    assert result["sae"]["status"] == "local" and result["sae"]["layer"] == world.layer
    assert result["packs"] and all(Path(p["path"]).parent == world.path / "packs" for p in result["packs"].values())
    assert result["dataset"]["rows"] > 0
    assert result["batch"]["processes"] == 2
    if recipe.trainer in RL_TRAINERS:
        weights = {r["name"]: r["weight"] for r in result["rewards"]}
        assert weights["judge_code_switch"] == weights["judge_loop"] == 0.0  # watched, not trained on
        assert weights["world_topic"] == 1.0
        assert result["batch"]["generation_batch_size"] % result["batch"]["num_generations"] == 0


def test_dry_run_checks_completion_probes(world, pack_files, tmp_path):
    from qscope_rl import load_sae
    from qscope_rl.features.probe import fit_completion_probe

    recipe_path = str(RECIPES / "grpo_amplified_repetition.yaml")
    common = ["--demo_world", str(world.path), "--output_dir", str(tmp_path)]
    missing = plan(parse_recipe(recipe_path, common + ["--repetition_probe", str(tmp_path / "loop.safetensors")],
                                dry_run=True))
    assert [m["fields"] for m in missing["missing_files"]] == [["repetition_probe"]]
    assert missing["missing_files"][0]["create_with"].startswith("qscope-rl features probe --model ")
    docs = world.documents("train")
    looping, clean = [d.text for d in docs if d.loop_char][:20], [d.text for d in docs if not d.loop_char][:20]
    probe = fit_completion_probe(world.model, world.tokenizer, load_sae(world.sae_dir, layer=world.layer), looping,
                                 clean)
    path = probe.save(tmp_path / "loop.safetensors")
    found = plan(parse_recipe(recipe_path, common + ["--repetition_probe", str(path)], dry_run=True))
    assert found["missing_files"] == [] and found["probes"]["repetition_probe"]["layer"] == world.layer
    probe.sae["layer"] = world.layer + 1
    other = probe.save(tmp_path / "other.safetensors")
    with pytest.raises(RecipeError, match=r"repetition_probe=.* was fitted on layer"):
        plan(parse_recipe(recipe_path, common + ["--repetition_probe", str(other)], dry_run=True))
    (tmp_path / "bad.safetensors").write_text("not a probe")
    with pytest.raises(RecipeError, match=r"repetition_probe=.*not a safetensors classifier file"):
        plan(parse_recipe(recipe_path, common + ["--repetition_probe", str(tmp_path / "bad.safetensors")],
                          dry_run=True))


@pytest.mark.parametrize("path", QWEN3, ids=lambda p: p.stem)
def test_qwen3_recipes_dry_run_offline_and_miss_only_packs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pack paths are relative: none exist here
    result = plan(parse_recipe(str(path), dry_run=True), processes=8)
    sae = result["sae"]
    assert sae["repo_id"].startswith("Qwen/SAE-Res-Qwen3-") and 0 <= sae["layer"] < sae["num_layers"]
    assert sae["status"] in ("download at start", "in the Hub cache")
    assert result["model"]["status"] in ("download at start", "in the Hub cache")
    assert result["missing_files"]
    parser = build_parser()
    for missing in result["missing_files"]:
        assert all(field.endswith("pack") for field in missing["fields"])
        # the suggested command parses with the real `qscope-rl features discover` arguments
        command = re.sub(r"<[^>]*>", "texts.jsonl", missing["create_with"].split("  #")[0])
        args = parser.parse_args(shlex.split(command)[1:])
        assert (args.command, args.features_command, args.layer) == ("features", "discover", sae["layer"])
    per_step = {"grpo_code_switch": 512, "grpo_amplified_repetition": 512, "rloo_code_switch": 256, "sasft": 256}
    assert result["batch"]["samples_per_optimizer_step"] == per_step[path.stem]  # as the recipes' comments say
    if "num_generations" in result["batch"]:
        assert result["batch"]["prompts_per_optimizer_step"] == 64


def write_recipe(tmp_path, **changes) -> str:
    values = yaml.safe_load(REAL.read_text())
    values.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"learning_rat": 1e-3}, r"unknown key 'learning_rat' in .*recipe.yaml \(did you mean 'learning_rate'\?\)"),
    ({"max_steps": "many"}, r"max_steps='many' in .*: expected int"),
    ({"max_steps": 2.5}, r"max_steps=2.5 in .*: expected int"),
    ({"save_strategy": False}, r"save_strategy=False .*one of \['no'.*quote them"),
    ({"dtype": "fp8"}, r"dtype='fp8' .*one of \['auto'"),
    ({"use_peft": "maybe"}, r"use_peft='maybe' .*expected bool"),
    ({"reward_weights": [1.0, "heavy", 0.0, 0.0]}, r"reward_weights=.*expected float"),
    ({"trainer": "ppo"}, r"trainer='ppo' .*expected one of \['grpo', 'rloo', 'sft'\]"),
    ({"reward_kwargs": {"nope": {}}}, r"reward_kwargs has settings for \['nope'\], which are not listed"),
    ({"per_device_train_batch_size": None}, r"per_device_train_batch_size=None .*not null"),
])
def test_bad_recipe_values_are_errors_naming_the_key(tmp_path, changes, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(write_recipe(tmp_path, **changes), dry_run=True)


@pytest.mark.parametrize("changes, overrides, message", [
    ({"reward_funcs": ["trl.rewards.accuracy_reward", "sae_code_switch", "judge_code_switch", "judge_lop"]}, [],
     r"reward_funcs: unknown reward 'judge_lop'; known rewards"),
    ({"reward_kwargs": {"sae_code_switch": {"feature_pak": "x"}}}, [],
     r"reward_kwargs.sae_code_switch=.*missing a required argument: 'feature_pack'"),
    ({"reward_kwargs": {"sae_code_switch": {"feature_pack": "x", "weigth": 1}}}, [],
     r"reward_kwargs.sae_code_switch=.*unexpected keyword argument 'weigth'"),
    ({"callbacks": ["sae_monitr"]}, [], r"callbacks: unknown callback 'sae_monitr'; known callbacks"),
    ({"sae_layer": 99}, [], r"sae_source='Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50', sae_layer=99: layer 99 does not"),
    ({"sae_source": "Qwen/Qwen3-0.6B"}, [], r"sae_source='Qwen/Qwen3-0.6B'.*no Qwen-Scope SAE release"),
    ({"reward_weights": [1.0, 0.0]}, [], r"reward_weights=\[1.0, 0.0\] has 2 weights for 4 reward_funcs"),
    ({}, ["--generation_batch_size", "32", "--per_device_train_batch_size", "16"],
     r"generation_batch_size=32 is not a multiple of per_device_train_batch_size x processes = 16 x 8"),
])
def test_unresolvable_fields_fail_the_dry_run_naming_them(tmp_path, changes, overrides, message):
    with pytest.raises(RecipeError, match=message):
        plan(parse_recipe(write_recipe(tmp_path, **changes), overrides, dry_run=True), processes=8)


def test_command_line_errors_name_the_argument(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert launch.main(["--config", path, "--max_steps", "abc", "--dry-run"]) == 2
    assert "argument --max_steps" in capsys.readouterr().err
    assert launch.main(["--config", path, "--learning_rat", "1e-4", "--dry-run"]) == 2
    assert "unknown arguments ['--learning_rat', '1e-4']" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="does not say which trainer.*to read a recipe file, pass --config"):
        parse_recipe(None, ["--recipe", path])  # a YAML given to another flag is not read as the recipe
    with pytest.raises(RecipeError, match="does not say which trainer: add"):
        parse_recipe(None, ["--max_steps", "2"])


def test_overrides_beat_the_file_and_reach_the_config(tmp_path):
    overrides = ["--learning_rate", "1e-4", "--reward_weights", "1", "2", "0", "0",
                 "--reward_kwargs", '{"sae_code_switch": {"feature_pack": "a.json"}}']
    recipe = parse_recipe(write_recipe(tmp_path), overrides, trainer="rloo", dry_run=True)
    assert recipe.trainer == "rloo" and type(recipe.config).__name__ == "SAERLOOConfig"
    assert recipe.config.learning_rate == 1e-4 and recipe.config.reward_weights == [1.0, 2.0, 0.0, 0.0]
    assert recipe.run.reward_kwargs == {"sae_code_switch": {"feature_pack": "a.json"}}


def test_dry_run_cli_prints_json_and_exits_1_while_packs_are_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--config", str(REAL), "--dry-run", "--json", "--processes", "8"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["trainer_class"] == "SAEGRPOTrainer" and result["batch"]["processes"] == 8


def test_local_dataset_prompts_become_trl_chat_prompts(tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "solution": "1"}) + "\n" for q in ("1+0?", "2-1?")))
    recipe = parse_recipe(write_recipe(tmp_path), ["--dataset_name", str(data), "--dataset_prompt_column", "question",
                                                   "--system_prompt", "Answer in English."], dry_run=True)
    assert plan(recipe, processes=8)["dataset"]["status"] == "local"
    rows = launch.load_train_dataset(recipe)
    assert rows.column_names == ["prompt", "solution"]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Answer in English."},
                                 {"role": "user", "content": "1+0?"}]
    with pytest.raises(RecipeError, match=r"dataset_prompt_column='problem': .* has columns"):
        launch.load_train_dataset(parse_recipe(write_recipe(tmp_path), ["--dataset_name", str(data)], dry_run=True))


def test_wandb_goes_offline_only_without_network_and_unset_mode(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no route")

    launcher = launch  # the launcher module (qscope_rl.trainers.launch is the package)
    monkeypatch.setattr(launcher.socket, "create_connection", no_network)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    launcher.use_offline_wandb_without_network(["none"])
    assert "WANDB_MODE" not in os.environ
    launcher.use_offline_wandb_without_network(["wandb"])
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    launcher.use_offline_wandb_without_network(["wandb"])
    assert os.environ["WANDB_MODE"] == "disabled"


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    def load(name):
        return load_config_from_file(str(RECIPES / "accelerate_configs" / f"{name}.yaml"))

    cpu = load("cpu")
    assert (cpu.distributed_type, cpu.num_processes, cpu.use_cpu) == (DistributedType.MULTI_GPU, 2, True)
    assert (load("ddp").distributed_type, load("ddp").num_processes) == (DistributedType.MULTI_GPU, 8)
    for stage in (2, 3):
        config = load(f"zero{stage}")
        assert config.distributed_type == DistributedType.DEEPSPEED and config.deepspeed_config["zero_stage"] == stage
    assert load("single_gpu").num_processes == 1
    multinode = load("multinode")
    assert multinode.num_machines > 1 and multinode.num_processes % multinode.num_machines == 0


@pytest.mark.parametrize("path", DEMO, ids=lambda p: p.stem)
def test_qscope_rl_train_runs_each_demo_recipe_on_the_test_world(path, world, pack_files, tmp_path):
    out = tmp_path / "run"
    trainer = trainer_of(path)
    argv = ["train", "--config", str(path), "--demo_world", str(world.path), *short_run(trainer, out)]
    assert cli_main(argv) == 0
    summary = json.loads((out / launch.RUN_FILE).read_text())
    assert (summary["global_step"], summary["num_processes"], summary["trainer"]) == (2, 1, trainer)
    assert (out / "model.safetensors").is_file()
    logged = set().union(*summary["log_history"])
    assert "loss" in logged
    if trainer in RL_TRAINERS:
        assert {"rewards/judge_code_switch/mean", "rewards/judge_loop/mean", "rewards/world_topic/mean"} <= logged
    else:
        assert "sae/aux_loss" in logged
    if "amplified" in path.stem:
        assert "sae/amplified_fraction" in logged
    if "code_switch" in path.stem:
        assert {"sae/code_switch_rate", "sae/aux_loss", "rewards/sae_code_switch/mean"} <= logged


def test_use_peft_trains_lora_adapters(world, pack_files, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", str(RECIPES / "grpo_code_switch.yaml"), "--demo_world", str(world.path),
            *short_run("grpo", out), "--use_peft", "true", "--lora_r", "4"]
    assert cli_main(argv) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow
def test_cpu_accelerate_config_trains_with_two_processes(world, pack_files, tmp_path):
    out = tmp_path / "run"
    recipe = RECIPES / "grpo_code_switch.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(RECIPES / "accelerate_configs" / "cpu.yaml"), "-m", "qscope_rl.trainers.launch",
           "--config", str(recipe), "--demo_world", str(world.path), *short_run("grpo", out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / launch.RUN_FILE).read_text())
    assert summary["num_processes"] == summary["torch_distributed_world_size"] == 2
    assert summary["global_step"] == 2


# -- the dry run promises what the run delivers (issue 19) -----------------------------------------------------


def demo_plan(world, tmp_path, name="grpo_code_switch.yaml", overrides=()):
    return plan(parse_recipe(str(RECIPES / name), ["--demo_world", str(world.path), "--output_dir",
                                                   str(tmp_path / "out"), *overrides], dry_run=True))


def sae_folder_like(world, tmp_path, layer, mutate=None):
    import torch

    folder = tmp_path / "sae" / world.sae_dir.name
    folder.mkdir(parents=True)
    weights = torch.load(next(world.sae_dir.glob("layer*.sae.pt")), weights_only=True)
    if mutate:
        weights = mutate(weights)
    torch.save(weights, folder / f"layer{layer}.sae.pt")
    return folder


def test_dry_run_checks_the_sae_against_the_model(world, pack_files, tmp_path):
    import torch

    n, hidden = world.model.config.num_hidden_layers, world.model.config.hidden_size
    beyond = sae_folder_like(world, tmp_path / "a", layer=n + 4)
    with pytest.raises(RecipeError, match=rf"sae_layer={n + 4}: the model .* has {n} decoder layers \(0..{n - 1}\)"):
        demo_plan(world, tmp_path, overrides=["--sae_source", str(beyond), "--sae_layer", str(n + 4),
                                              "--code_switch_pack", "null"])
    narrow = sae_folder_like(world, tmp_path / "b", layer=world.layer, mutate=lambda w: {
        "W_enc": w["W_enc"][:, :16].contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"][:16].contiguous(),
        "b_dec": w["b_dec"][:16]})
    with pytest.raises(RecipeError, match=rf"reads vectors of d_in=16, but the model .* has hidden_size={hidden}"):
        demo_plan(world, tmp_path, overrides=["--sae_source", str(narrow)])
    cut = sae_folder_like(world, tmp_path / "c", layer=world.layer)
    sae_file = next(cut.glob("*.pt"))
    sae_file.write_bytes(sae_file.read_bytes()[:2000])
    with pytest.raises(RecipeError, match=r"sae_source=.*could not read .*corrupt"):
        demo_plan(world, tmp_path, overrides=["--sae_source", str(cut)])
    other = sae_folder_like(world, tmp_path / "d", layer=world.layer, mutate=lambda w: {
        **w, "b_enc": w["b_enc"] + torch.ones_like(w["b_enc"])})  # same shape, other weights
    with pytest.raises(RecipeError, match=r"code_switch_pack=.*SAE digest"):
        demo_plan(world, tmp_path, overrides=["--sae_source", str(other)])


def test_dry_run_checks_batch_sizes_and_pack_contents(world, pack_files, tmp_path):
    with pytest.raises(RecipeError, match="per_device_train_batch_size=0: must be >= 1"):
        demo_plan(world, tmp_path, overrides=["--per_device_train_batch_size", "0"])
    pack = json.loads(pack_files["zh"].read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**pack, "features": []}))
    with pytest.raises(RecipeError, match=r"code_switch_pack=.*empty.json.*has no features"):
        demo_plan(world, tmp_path, overrides=["--code_switch_pack", str(tmp_path / "empty.json")])
    stripped = {**pack, "features": [{**f, "stats": {k: v for k, v in f["stats"].items() if k != "mean_pre"}}
                                     for f in pack["features"]]}
    (tmp_path / "nomean.json").write_text(json.dumps(stripped))
    with pytest.raises(RecipeError, match=r"sasft_pack=.*no mean_pre.*sasft_alpha: zero"):
        demo_plan(world, tmp_path, "sasft.yaml", overrides=["--sasft_pack", str(tmp_path / "nomean.json")])
    assert demo_plan(world, tmp_path, "sasft.yaml", overrides=["--sasft_pack", str(tmp_path / "nomean.json"),
                                                               "--sasft_alpha", "zero"])["packs"]


def test_dry_run_refuses_no_reward_funcs(world, pack_files, tmp_path):
    values = yaml.safe_load((RECIPES / "grpo_code_switch.yaml").read_text())
    values.pop("reward_funcs", None)
    values.pop("reward_kwargs", None)
    values.pop("reward_weights", None)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(RecipeError, match="reward_funcs is empty"):
        plan(parse_recipe(str(tmp_path / "r.yaml"), ["--demo_world", str(world.path)], dry_run=True))


def test_dry_run_offline_says_what_must_be_downloaded_and_how(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = plan(parse_recipe(str(REAL), dry_run=True), processes=8)
    if result["sae"]["status"] == "download at start":
        assert {"what": "sae", "repo": result["sae"]["repo_id"],
                "command": f"hf download {result['sae']['repo_id']} {result['sae']['file']}"} in \
            result["offline_downloads"]
    assert cli_main(["train", "--config", str(REAL), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "OFFLINE  HF_HUB_OFFLINE is set" in out and "pre-download it where there is network: hf download" in out


def test_resume_from_checkpoint_is_checked_by_the_dry_run(world, pack_files, tmp_path):
    with pytest.raises(RecipeError, match="resume_from_checkpoint=True: no checkpoint-<step> folder"):
        demo_plan(world, tmp_path, overrides=["--resume_from_checkpoint", "true"])
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "checkpoint-4").mkdir()
    with pytest.raises(RecipeError, match=r"checkpoint-4 is incomplete.*checkpoint-2, the last complete one"):
        demo_plan(world, tmp_path, overrides=["--resume_from_checkpoint", "true"])
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(tmp_path / "out" / "checkpoint-4")
    assert demo_plan(world, tmp_path, overrides=["--resume_from_checkpoint", "true"])["resume_from"].endswith(
        "checkpoint-2")
