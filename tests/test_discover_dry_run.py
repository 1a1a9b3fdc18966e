"""``qscope-rl features discover --dry-run`` and language discovery from one text file per language."""

import json

import pytest
import transformers as tf
from tiny_models import EN, HIDDEN, LAYER, ZH

from qscope_rl.cli import main


@pytest.fixture
def user_files(user_model_and_sae):
    """The user's model and SAE folders (conftest) and one text file per language beside them."""
    model_dir, sae_dir = user_model_and_sae
    folder = model_dir.parent
    (folder / "en.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in EN))
    (folder / "zh.txt").write_text("\n".join(ZH))
    return folder, sae_dir


def dry_run(capsys, *argv):
    status = main(["features", "discover", "language", *argv, "--dry-run"])
    return status, json.loads(capsys.readouterr().out)


def test_dry_run_checks_everything_and_loads_nothing_big(user_files, capsys, monkeypatch):
    folder, sae_dir = user_files
    loaded = []
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    texts = ["--lang-texts", f"en={folder / 'en.jsonl'}", "--lang-texts", f"zh={folder / 'zh.txt'}"]
    status, plan = dry_run(capsys, "--model", str(folder / "model"), "--sae", str(sae_dir), "--layer", str(LAYER),
                           *texts)
    assert status == 0 and plan["ok"] and plan["problems"] == [] and not loaded
    assert plan["model"] == {"source": str(folder / "model"), "status": "local", "hidden_size": HIDDEN,
                             "num_layers": 3}
    assert (plan["sae"]["d_in"], plan["sae"]["layer"], plan["sae"]["k"]) == (HIDDEN, LAYER, 6)
    assert plan["texts"] == {"en": 4, "zh": 3}
    assert any("only 3 texts" in n for n in plan["notes"])

    # Every problem at once: a layer past the model's, a missing text file.
    status, plan = dry_run(capsys, "--model", str(folder / "model"), "--sae", str(sae_dir), "--layer", "5",
                           "--lang-texts", f"en={folder / 'en.jsonl'}", "--lang-texts", f"zh={folder / 'nope.txt'}")
    assert status == 1 and not plan["ok"]
    assert any("--layer 5: " in p and "3 decoder layers" in p for p in plan["problems"])
    assert any("no layer5.sae.pt" in p for p in plan["problems"])
    assert any("nope.txt does not exist" in p for p in plan["problems"])
    status, plan = dry_run(capsys, "--model", str(folder / "model"), "--sae", str(sae_dir), "--layer", str(LAYER),
                           "--lang-texts", f"en={folder / 'en.jsonl'}")
    assert status == 1 and any("at least two languages, got ['en']" in p for p in plan["problems"])


def test_dry_run_on_hub_names_downloads_nothing(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps({"text": t, "lang": lang})
                                                    for lang, ts in (("en", EN), ("zh", ZH)) for t in ts))
    status, plan = dry_run(capsys, "--model", "Qwen/Qwen3-1.7B", "--sae", "qwen-scope-3-1.7b-base-w32k-l50",
                           "--layer", "14", "--texts", str(tmp_path / "mixed.jsonl"))
    assert status == 0, plan["problems"]
    assert plan["model"] == {"source": "Qwen/Qwen3-1.7B", "status": "download at start"}
    assert plan["sae"]["repo_id"] == "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
    assert (plan["sae"]["files"], plan["sae"]["status"]) == (["layer14.sae.pt"], "download at start")
    status, plan = dry_run(capsys, "--model", "Qwen/Qwen3-8B", "--sae", "qwen-scope-3-1.7b-base-w32k-l50",
                           "--layer", "14", "--texts", str(tmp_path / "mixed.jsonl"))
    assert any("trained on Qwen3-1.7B-Base, but the model is Qwen/Qwen3-8B" in n for n in plan["notes"])
    status, plan = dry_run(capsys, "--model", "Qwen/Qwen3-1.7B", "--sae", "qwen-scope-3-1.7b-base-w32k-l5",
                           "--layer", "30", "--texts", str(tmp_path / "mixed.jsonl"))
    assert status == 1 and any("did you mean" in p for p in plan["problems"])
    status, plan = dry_run(capsys, "--model", "Qwen/Qwen3-1.7B", "--sae", "Qwen/Qwen3-1.7B", "--layer", "30",
                           "--texts", str(tmp_path / "mixed.jsonl"))
    assert status == 1 and any("layer 30 does not exist" in p for p in plan["problems"])


def test_discovery_from_one_file_per_language(user_files, capsys):
    folder, sae_dir = user_files
    out = folder / "packs"
    assert main(["features", "discover", "language", "--model", str(folder / "model"), "--sae", str(sae_dir),
                 "--layer", str(LAYER), "--top-k", "4", "--lang-texts", f"en={folder / 'en.jsonl'}",
                 "--lang-texts", f"zh={folder / 'zh.txt'}", "--out", str(out)]) == 0
    from qscope_rl.features.feature_pack import FeaturePack

    zh = FeaturePack.load(out / "language-zh.json")
    assert zh.data["n_texts"] == {"en": 4, "zh": 3} and 0 < len(zh) <= 4
    with pytest.raises(SystemExit, match="expected LANG=FILE"):
        main(["features", "discover", "language", "--model", str(folder / "model"), "--sae", str(sae_dir),
              "--layer", str(LAYER), "--lang-texts", str(folder / "zh.txt"), "--lang-texts", "en=x"])
