"""Recipes name an SAE the SAELens way too: a release plus ``sae_id`` (``layer14``), alongside release/layer."""

from pathlib import Path

import pytest
import yaml

from qscope_rl.trainers.launch.dry_run import plan
from qscope_rl.trainers.launch.recipe import RecipeError, parse_recipe

REAL = Path(__file__).resolve().parents[1] / "recipes" / "qwen3" / "grpo_code_switch.yaml"
SAELENS_RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"  # SAELens' name of Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recipe_with(tmp_path, drop=(), **changes) -> str:
    values = {k: v for k, v in yaml.safe_load(REAL.read_text()).items() if k not in drop}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values | changes))
    return str(path)


def test_saelens_release_and_sae_id_resolve_to_the_qwen_scope_layer_file(tmp_path):
    recipe = parse_recipe(recipe_with(tmp_path, drop=("sae_layer",), sae_source=SAELENS_RELEASE, sae_id="layer14"),
                          dry_run=True)
    assert (recipe.config.sae_id, recipe.config.sae_layer) == ("layer14", 14)  # the layer follows from the id
    sae = plan(recipe, processes=8)["sae"]
    assert (sae["repo_id"], sae["file"], sae["layer"]) == ("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50",
                                                           "layer14.sae.pt", 14)
    both = parse_recipe(recipe_with(tmp_path, sae_source=SAELENS_RELEASE, sae_id="layer14", sae_layer=14), dry_run=True)
    assert both.config.sae_layer == 14  # the same layer twice is fine


@pytest.mark.parametrize("changes, drop, message", [
    ({"sae_id": "layer14", "sae_layer": 12}, (), r"sae_id='layer14' is layer 14, but sae_layer=12"),
    ({"sae_source": SAELENS_RELEASE, "sae_id": "blocks.14.hook_resid_post"}, ("sae_layer",),
     r"sae_id 'blocks.14.hook_resid_post' is not a Qwen-Scope SAE id: .*layer<L>"),
    ({"sae_id": ""}, (), r"sae_id='': expected the name of one SAE"),
    ({"sae_id": "layer14"}, ("sae_source", "code_switch_pack", "aux_loss_weight", "reward_funcs", "reward_weights",
                             "reward_kwargs"),
     r"sae_id='layer14' needs sae_source"),
])
def test_bad_sae_ids_are_errors_naming_the_key(tmp_path, changes, drop, message):
    with pytest.raises(RecipeError, match=message):
        plan(parse_recipe(recipe_with(tmp_path, drop=drop, **changes), dry_run=True), processes=8)


def test_a_local_sae_folder_takes_its_layer_from_sae_id(world, tmp_path):
    demo = Path(__file__).resolve().parents[1] / "recipes" / "grpo_code_switch.yaml"
    overrides = ["--demo_world", str(world.path), "--output_dir", str(tmp_path), "--sae_source", str(world.sae_dir),
                 "--sae_id", f"layer{world.layer}"]
    result = plan(parse_recipe(str(demo), overrides, dry_run=True), processes=2)
    assert result["sae"]["layer"] == world.layer and result["sae"]["status"] == "local"
    wrong = f"layer{world.layer + 1}"
    message = f"sae_layer={world.layer + 1} \\(sae_id='{wrong}'\\): .*holds SAEs for layers \\[{world.layer}\\]"
    with pytest.raises(RecipeError, match=message):
        plan(parse_recipe(str(demo), overrides[:-1] + [wrong], dry_run=True), processes=2)
