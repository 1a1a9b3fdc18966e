"""SAELens release names and sae_ids for Qwen-Scope, SAELens-format Hub repos, all through a mimicked Hub cache.

No network: each test builds the layout huggingface_hub keeps on disk (``models--org--name/refs/main`` and
``snapshots/<commit>/...``) in a temporary HF_HUB_CACHE and loads with HF_HUB_OFFLINE=1, which is what
`load_sae` does on a machine where the files were downloaded before.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loaders import D_IN, D_SAE, saelens_folder, write_qwen_scope
from test_sae import naive_topk_encode
from torch.testing import assert_close

import qscope_rl.sae.releases as releases
from qscope_rl import QWEN_SCOPE_RELEASES, SAELoadError, load_sae
from qscope_rl.sae.loaders import resolve_hub_sae
from qscope_rl.sae.releases import Release, release_for_saelens_name

FIXTURES = Path(__file__).parent / "fixtures"
TINY = Release("Qwen3-Tiny-Base", "64", 7, 5, D_IN, D_SAE)  # a release small enough to write: 5 layers, 16 x 64


def hub_cache(monkeypatch, tmp_path, repo_id: str) -> Path:
    """A snapshot folder of ``repo_id`` in a fresh offline Hub cache; files written into it are "downloaded"."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


@pytest.fixture
def tiny_release(monkeypatch):
    monkeypatch.setattr(releases, "QWEN_SCOPE_RELEASES", (*QWEN_SCOPE_RELEASES, TINY))
    return TINY


def test_saelens_names_match_saelens_registry():
    # tests/fixtures/saelens_qwen_scope.json: the Qwen-Scope entries of SAELens' pretrained_saes.yaml
    # (release name -> repo_id and sae ids), written by tests/fixtures/make_saelens_oracle.py.
    registry = json.loads((FIXTURES / "saelens_qwen_scope.json").read_text())
    assert len(registry) == 14
    ours = {r.saelens_release: r for r in QWEN_SCOPE_RELEASES}
    assert set(ours) == set(registry)
    for name, entry in registry.items():
        release = ours[name]
        assert release.repo_id == entry["repo_id"], name
        assert entry["sae_ids"] == [f"layer{layer}" for layer in range(release.num_layers)], name
        assert release_for_saelens_name(name.upper()) is release


def test_release_name_and_sae_id_load_one_layer_file(monkeypatch, tmp_path, tiny_release):
    snapshot = hub_cache(monkeypatch, tmp_path, tiny_release.repo_id)
    weights = write_qwen_scope(snapshot, layers=(3,))[3]
    name = tiny_release.saelens_release
    assert name == "qwen-scope-3-tiny-base-w64-l7"
    x = torch.randn(5, D_IN)
    for sae in (load_sae(name, layer=3), load_sae(name, "layer3"), load_sae(name, sae_id="layer3"),
                load_sae(tiny_release.repo_id, sae_id="layer3")):
        assert (sae.layer, sae.k, sae.d_sae) == (3, 7, D_SAE)
        assert_close(sae.encode(x), naive_topk_encode(x, weights, 7))
    hub = resolve_hub_sae(name, None, sae_id="layer3")
    assert (hub.repo_id, hub.files, hub.layer, hub.is_cached()) == (tiny_release.repo_id, ("layer3.sae.pt",), 3, True)
    assert not resolve_hub_sae(name, 2).is_cached()
    with pytest.raises(SAELoadError, match=r"layer2.sae.pt .*HF_HUB_OFFLINE"):
        load_sae(name, layer=2)  # not in the cache, and offline: the usual actionable error
    with pytest.raises(ValueError, match="layer 5 does not exist .* 5 decoder layers"):
        load_sae(name, "layer5")
    with pytest.raises(SAELoadError, match="sae_id='layer3' is layer 3, but layer=2"):
        load_sae(name, layer=2, sae_id="layer3")
    with pytest.raises(SAELoadError, match="not a Qwen-Scope SAE id"):
        load_sae(name, sae_id="blocks.3.hook_resid_post")
    with pytest.raises(SAELoadError, match="give the SAE id once"):
        load_sae(name, "layer3", sae_id="layer3")


def test_unknown_saelens_name_suggests_the_close_ones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    close = r"not one of SAELens' 14 .*did you mean \['qwen-scope-3-1.7b-base-w32k-l50'"
    with pytest.raises(SAELoadError, match=close):
        load_sae("qwen-scope-3-1.7b-base-w32k-l5", layer=14)
    with pytest.raises(SAELoadError, match="pass sae_id="):
        load_sae("someone/not-a-qwen-model", layer=3)
    hub = resolve_hub_sae("qwen-scope-3-1.7b-base-w32k-l50", None, sae_id="layer14")
    assert (hub.repo_id, hub.filename, hub.k) == ("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", "layer14.sae.pt", 50)


def test_saelens_format_hub_repo_with_subfolder(monkeypatch, tmp_path):
    snapshot = hub_cache(monkeypatch, tmp_path, "someone/saes")
    local, tensors = saelens_folder(tmp_path, "standard")
    sub = snapshot / "blocks.4.hook_resid_post"
    sub.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (sub / name).write_bytes((local / name).read_bytes())
    hub = resolve_hub_sae("someone/saes", None, sae_id="blocks.4.hook_resid_post")
    assert hub.files == ("blocks.4.hook_resid_post/cfg.json", "blocks.4.hook_resid_post/sae_weights.safetensors")
    assert hub.is_cached()
    sae = load_sae("someone/saes", sae_id="blocks.4.hook_resid_post")
    x = torch.randn(6, D_IN)
    assert sae.layer == 4
    assert_close(sae.encode(x), ((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]).relu())
    assert_close(sae.encode(x), load_sae(local).encode(x))
    with pytest.raises(SAELoadError, match="trained on layer 4, but layer 2"):
        load_sae("someone/saes", layer=2, sae_id="blocks.4.hook_resid_post")
    with pytest.raises(SAELoadError, match=r"other/cfg.json .*HF_HUB_OFFLINE.*--include 'other/\*'.*sae_id='other'"):
        load_sae("someone/saes", sae_id="other")
    # The same repo downloaded to a local folder (`hf download ... --local-dir`), addressed by sae_id.
    assert_close(load_sae(snapshot, sae_id="blocks.4.hook_resid_post").encode(x), sae.encode(x))
    with pytest.raises(SAELoadError, match="no subfolder 'nope'"):
        load_sae(snapshot, sae_id="nope")


def test_local_qwen_scope_folder_takes_the_layer_sae_id(tmp_path):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_7"
    write_qwen_scope(folder, layers=(2, 3))
    assert load_sae(folder, "layer2").layer == 2
    with pytest.raises(SAELoadError, match="is layer 3, but layer=2"):
        load_sae(folder, layer=2, sae_id="layer3")


def test_saelens_oracle(monkeypatch, tmp_path):
    """Against outputs of SAELens itself (tests/fixtures/make_saelens_oracle.py, run once with sae-lens installed):
    its `SAE.from_pretrained(release, "layer3")` on a Qwen-Scope-layout file, and the folder its `save_model` wrote."""
    oracle = load_file(FIXTURES / "saelens_oracle.safetensors")
    meta = json.loads((FIXTURES / "saelens_oracle.json").read_text())
    real = release_for_saelens_name(meta["release"])
    small = replace(real, d_model=meta["d_in"], d_sae=meta["d_sae"])  # the oracle's shapes, the release's name and k
    monkeypatch.setattr(releases, "QWEN_SCOPE_RELEASES", tuple(small if r is real else r for r in QWEN_SCOPE_RELEASES))
    snapshot = hub_cache(monkeypatch, tmp_path, real.repo_id)
    torch.save({n: oracle[f"qwen_scope.{n}"] for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
               snapshot / f"layer{meta['layer']}.sae.pt")
    x = oracle["x"]
    sae = load_sae(meta["release"], f"layer{meta['layer']}")  # SAELens' own call: SAE.from_pretrained(release, id)
    assert (sae.k, sae.layer) == (meta["k"], meta["layer"])
    assert_close(sae.encode(x), oracle["saelens.encode"])
    assert_close(sae.decode(sae.encode(x)), oracle["saelens.decode"], rtol=1e-5, atol=1e-5)
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(meta["saved_cfg"]))
    save_file({n.removeprefix("saved."): t for n, t in oracle.items() if n.startswith("saved.")},
              folder / "sae_weights.safetensors")
    saved = load_sae(folder)
    assert (saved.k, saved.layer, saved.architecture) == (meta["k"], meta["layer"], "topk")
    assert_close(saved.encode(x), oracle["saelens.encode"])
    assert_close(saved.decode(saved.encode(x)), oracle["saelens.decode"], rtol=1e-5, atol=1e-5)
