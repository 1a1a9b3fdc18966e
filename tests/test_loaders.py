"""load_sae: parity with each format's reference math, Hub/offline behaviour, and refusals."""

import json
import os

import pytest
import torch
from peak_memory import peak_tensor_bytes
from safetensors.torch import save_file
from test_sae import naive_topk_encode, random_weights
from torch.testing import assert_close

from qscope_rl import QWEN_SCOPE_RELEASES, SAELoadError, find_release, load_sae

D_IN, D_SAE = 16, 64


def write_qwen_scope(folder, layers=(3,), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for layer in layers:
        w = {n: t for n, t in random_weights(seed + layer).items() if n != "threshold"}
        torch.save(w, folder / f"layer{layer}.sae.pt")
        weights[layer] = w
    return weights


def test_qwen_scope_folder_parity_and_k_from_name(tmp_path):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_7"
    weights = write_qwen_scope(folder, layers=(2, 3))
    sae = load_sae(folder, layer=3)
    assert (sae.k, sae.layer, sae.d_in, sae.d_sae, sae.architecture) == (7, 3, D_IN, D_SAE, "topk")
    x = torch.randn(9, D_IN)
    assert_close(sae.encode(x), naive_topk_encode(x, weights[3], 7))
    assert load_sae(folder / "layer2.sae.pt").layer == 2
    assert load_sae(folder, layer=3, k=4).k == 4
    assert load_sae(folder, layer=3, dtype=torch.bfloat16).W_enc.dtype == torch.bfloat16


def test_qwen_scope_layer_errors(tmp_path):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_7"
    write_qwen_scope(folder, layers=(2, 3))
    with pytest.raises(SAELoadError, match=r"layers \[2, 3\]: pass layer="):
        load_sae(folder)
    with pytest.raises(SAELoadError, match=r"no layer5.sae.pt; it has layers \[2, 3\]"):
        load_sae(folder, layer=5)
    with pytest.raises(SAELoadError, match="holds layer 2, but layer 3"):
        load_sae(folder / "layer2.sae.pt", layer=3)
    unnamed = tmp_path / "my_sae"
    write_qwen_scope(unnamed)
    with pytest.raises(SAELoadError, match="cannot tell k"):
        load_sae(unnamed, layer=3)
    with pytest.raises(SAELoadError, match="does not exist"):
        load_sae(tmp_path / "nowhere", layer=3)
    with pytest.raises(SAELoadError, match="no SAE found"):
        load_sae(tmp_path, layer=3)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "SAE-Res-Evil-W64-L0_7"
    folder.mkdir()
    torch.save({"W_enc": _RunsCode()}, folder / "layer0.sae.pt")
    with pytest.raises(SAELoadError, match="refusing to load .*could run code"):
        load_sae(folder, layer=0)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_corrupt_and_wrong_content_files(tmp_path):
    folder = tmp_path / "SAE-Res-Bad-W64-L0_7"
    folder.mkdir()
    (folder / "layer0.sae.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(SAELoadError, match="corrupt"):
        load_sae(folder, layer=0)
    torch.save([torch.zeros(3)], folder / "layer1.sae.pt")
    with pytest.raises(SAELoadError, match="dict of tensors"):
        load_sae(folder, layer=1)
    w = {n: t for n, t in random_weights().items() if n != "threshold"}
    w["W_dec"] = torch.full_like(w["W_dec"], float("inf"))
    torch.save(w, folder / "layer2.sae.pt")
    with pytest.raises(SAELoadError, match="NaN or inf"):
        load_sae(folder, layer=2)


def saelens_folder(tmp_path, architecture, **cfg_extra):
    w = random_weights(5)
    folder = tmp_path / f"saelens-{architecture}"
    folder.mkdir(parents=True)
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"].T.contiguous(),
               "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
    if architecture == "jumprelu":
        tensors["threshold"] = w["threshold"]
    save_file(tensors, folder / "sae_weights.safetensors")
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.4.hook_resid_post"}, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, tensors


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens_parity(tmp_path, architecture):
    folder, t = saelens_folder(tmp_path, architecture, **({"k": 6} if architecture == "topk" else {}))
    sae = load_sae(folder)
    assert sae.layer == 4
    x = torch.randn(8, D_IN)
    # SAELens reference math, in its own [d_in, d_sae] layout.
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if architecture == "standard":
        expected = pre.relu()
    elif architecture == "jumprelu":
        expected = pre.relu() * (pre > t["threshold"])
    else:
        values, indices = pre.topk(6)
        expected = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    assert_close(sae.encode(x), expected)
    assert_close(sae.decode(expected), expected @ t["W_dec"] + t["b_dec"])


def test_saelens_refusals(tmp_path):
    folder, _ = saelens_folder(tmp_path, "gated")
    with pytest.raises(SAELoadError, match="'gated' is not supported"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D_IN + 1}))
    with pytest.raises(SAELoadError, match="cfg.json says d_in=17"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{broken")
    with pytest.raises(SAELoadError, match="not valid JSON"):
        load_sae(folder)
    resid_pre, _ = saelens_folder(tmp_path / "pre", "standard",
                                  metadata={"hook_name": "blocks.4.hook_resid_pre"})
    assert load_sae(resid_pre).layer == 3  # resid_pre of block 4 is the output of layer 3
    with pytest.raises(SAELoadError, match="trained on layer 3, but layer 5"):
        load_sae(resid_pre, layer=5)


def test_sparsify_parity_with_sparsify_itself(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=6))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_()
    coder.save_to_disk(tmp_path / "run" / "layers.2")
    sae = load_sae(tmp_path / "run", layer=2)
    assert (sae.layer, sae.k, sae.d_sae) == (2, 6, D_SAE)
    x = torch.randn(10, D_IN)
    reference = coder.encode(x)
    ours = sae.encode_sparse(x)
    dense_ref = torch.zeros(10, D_SAE).scatter(-1, reference.top_indices, reference.top_acts)
    assert_close(ours.to_dense(D_SAE), dense_ref)
    assert_close(sae.decode_sparse(ours), coder.decode(reference.top_acts, reference.top_indices),
                 rtol=1e-4, atol=1e-4)
    with pytest.raises(SAELoadError, match=r"no SAE for layer 9; it has layers \[2\]"):
        load_sae(tmp_path / "run", layer=9)


def test_release_table():
    assert len(QWEN_SCOPE_RELEASES) == 14
    assert len({r.repo_id for r in QWEN_SCOPE_RELEASES}) == 14
    release = find_release("Qwen/Qwen3-1.7B")
    assert release.repo_id == "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
    assert (release.num_layers, release.d_model, release.d_sae) == (28, 2048, 32768)
    assert find_release("Qwen3-30B-A3B-Base", k=100).d_sae == 131072
    with pytest.raises(ValueError, match="no Qwen-Scope SAE release for model 'gpt2'"):
        find_release("gpt2")
    with pytest.raises(ValueError, match="available"):
        find_release("Qwen3-8B", k=7)


def test_hub_layer_is_checked_before_download_and_offline_error_is_actionable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="layer 40 does not exist .* 28 decoder layers"):
        load_sae("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", layer=40)
    with pytest.raises(SAELoadError, match=r"layer3.sae.pt .*HF_HUB_OFFLINE.*hf download"):
        load_sae("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", layer=3)
    with pytest.raises(SAELoadError, match="pass layer="):
        load_sae("Qwen/Qwen3-8B")


# -- hostile input (issue 19) ----------------------------------------------------------------------------


def test_k_zero_is_refused_not_taken_for_unset(tmp_path):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_7"
    write_qwen_scope(folder)
    for bad in (0, -3):
        with pytest.raises(SAELoadError, match=f"k={bad}: k must be a positive integer"):
            load_sae(folder, layer=3, k=bad)
    sl, _ = saelens_folder(tmp_path, "topk", k=6)
    with pytest.raises(SAELoadError, match="k=0"):
        load_sae(sl, k=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused(tmp_path, dtype):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_7"
    folder.mkdir()
    w = {n: (t > 0).to(dtype) for n, t in random_weights(0).items() if n != "threshold"}
    torch.save(w, folder / "layer3.sae.pt")
    with pytest.raises(SAELoadError, match=r"W_enc has dtype torch\.(int64|bool).*floating-point"):
        load_sae(folder, layer=3)


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", r"cfg.json must hold a JSON object, got list"),
    (json.dumps({"architecture": "standard", "d_in": "16"}).encode(), r"cfg.json: field 'd_in' must be an integer, "
                                                                      r"got the string '16'"),
    (json.dumps({"architecture": "topk", "k": "6"}).encode(), r"cfg.json: field 'k' must be an integer"),
    (b"\xff\xfe{\x00", r"cfg.json is not UTF-8 text"),
])
def test_malformed_cfg_json_names_the_file_and_field(tmp_path, content, message):
    folder, _ = saelens_folder(tmp_path, "standard")
    (folder / "cfg.json").write_bytes(content)
    with pytest.raises(SAELoadError, match=message):
        load_sae(folder)


def test_hub_resolution_refuses_k_zero_before_any_download():
    from qscope_rl.sae.loaders import resolve_hub_sae

    with pytest.raises(SAELoadError, match="k=0: k must be a positive integer"):
        resolve_hub_sae("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", 3, k=0)


def test_loading_allocates_the_weights_once(tmp_path):
    # The values check once held an abs() copy and two masks of the whole W_dec: 1.75x the SAE at load time.
    d_in, d_sae = 64, 16384
    folder = tmp_path / "SAE-Res-random-W16K-L0_8"
    folder.mkdir()
    W_dec = torch.randn(d_in, d_sae)
    torch.save({"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
                "b_dec": torch.zeros(d_in)}, folder / "layer0.sae.pt")
    loaded = []
    peak = peak_tensor_bytes(lambda: loaded.append(load_sae(folder, 0)))
    sae = loaded[0]
    weights = sum(p.numel() * p.element_size() for p in sae.parameters())
    assert weights <= peak <= 1.1 * weights
