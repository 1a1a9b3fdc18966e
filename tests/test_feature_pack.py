"""FeaturePack: JSON round trip, schema errors, compatibility checks, top(n)."""

import json

import pytest
import torch

from qscope_rl import SparseAutoencoder
from qscope_rl.features.feature_pack import Feature, FeaturePack, FeaturePackError, texts_sha256


def make_pack(d_sae=64, d_in=16, layer=2, n=5):
    features = [Feature(i * 3, f"zh-{i * 3}", 1.0 - i / 10, {"mean_pre": 0.5 + i, "p_fire_pos": 0.9})
                for i in range(n)]
    return FeaturePack(name="language-zh", method="language", model="tiny", sae_source="/sae", layer=layer,
                       d_sae=d_sae, d_in=d_in, features=features, data={"language": "zh", "sha256": {"zh": "x"}})


def test_round_trip_ids_alphas_and_top(tmp_path):
    pack = make_pack()
    loaded = FeaturePack.load(pack.save(tmp_path / "sub" / "pack.json"))
    assert loaded == pack
    assert loaded.ids.tolist() == [0, 3, 6, 9, 12] and loaded.ids.dtype == torch.long
    torch.testing.assert_close(loaded.alphas, torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5]))
    top = loaded.top(2)
    assert top.ids.tolist() == [0, 3] and len(loaded) == 5 and top.layer == pack.layer


def test_check_compatible_names_each_mismatch():
    pack = make_pack()
    pack.check_compatible(SparseAutoencoder(16, 64, k=4, layer=2))
    with pytest.raises(ValueError, match="another SAE.*d_sae 64 != 128"):
        pack.check_compatible(SparseAutoencoder(16, 128, k=4, layer=2))
    with pytest.raises(ValueError, match="d_in 16 != 8"):
        pack.check_compatible(SparseAutoencoder(8, 64, k=4, layer=2))
    with pytest.raises(ValueError, match="layer 2 != 5"):
        pack.check_compatible(SparseAutoencoder(16, 64, k=4, layer=2), layer=5)
    with pytest.raises(ValueError, match="layer 2 != 3"):
        pack.check_compatible(SparseAutoencoder(16, 64, k=4, layer=3))


@pytest.mark.parametrize("corrupt, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a feature pack"),
    (json.dumps({"format": "something-else"}), "not a feature pack"),
    ("VERSION", "version 99"),
    ("DROP:d_sae", "lacks the field 'd_sae'"),
    ("SET:layer=\"2\"", "field 'layer' must be int"),
    ("SET:features=[{\"id\": 1}]", r"features\[0\] lacks the field 'name'"),
    ("SET:features=[{\"id\": 99, \"name\": \"x\", \"score\": 1.0, \"stats\": {}}]", "out of range"),
    ("SET:features=[{\"id\": 1, \"name\": \"x\", \"score\": 1.0, \"stats\": {\"mean_pre\": \"a\"}}]", "finite"),
    ("SET:method=\"magic\"", "method 'magic'"),
])
def test_corrupt_files_get_clear_errors(tmp_path, corrupt, message):
    path = tmp_path / "pack.json"
    d = make_pack().to_dict()
    if corrupt == "VERSION":
        d["version"] = 99
        text = json.dumps(d)
    elif corrupt.startswith("DROP:"):
        d.pop(corrupt[5:])
        text = json.dumps(d)
    elif corrupt.startswith("SET:"):
        key, value = corrupt[4:].split("=", 1)
        d[key] = json.loads(value)
        text = json.dumps(d)
    else:
        text = corrupt
    path.write_text(text)
    with pytest.raises(FeaturePackError, match=message):
        FeaturePack.load(path)


def test_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(FeaturePackError, match="does not exist"):
        FeaturePack.load(tmp_path / "nope.json")
    with pytest.raises(FeaturePackError, match="twice"):
        FeaturePack("p", "contrastive", "m", "s", 0, 8, 4, [Feature(1, "a", 1.0), Feature(1, "b", 0.5)])
    with pytest.raises(FeaturePackError, match="no mean_pre"):
        FeaturePack("p", "contrastive", "m", "s", 0, 8, 4, [Feature(1, "a", 1.0)]).alphas  # noqa: B018


def test_texts_sha256_is_order_and_boundary_sensitive():
    assert texts_sha256(["ab", "c"]) != texts_sha256(["a", "bc"])
    assert texts_sha256(["a", "b"]) != texts_sha256(["b", "a"])
    assert texts_sha256(["a", "b"]) == texts_sha256(iter(["a", "b"]))


def test_pack_records_the_sae_digest_and_refuses_another_sae_of_the_same_shape(tmp_path):
    import warnings

    from qscope_rl.sae.identity import sae_digest

    torch.manual_seed(0)
    sae, other = SparseAutoencoder(16, 64, k=4, layer=2), SparseAutoencoder(16, 64, k=4, layer=2)
    with torch.no_grad():
        for module in (sae, other):
            module.b_enc.normal_()
    pack = make_pack()
    pack.sae_digest = sae_digest(sae)
    loaded = FeaturePack.load(pack.save(tmp_path / "pack.json"))
    assert loaded.sae_digest == sae_digest(sae) and loaded.top(2).sae_digest == sae_digest(sae)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.check_compatible(sae)
    with pytest.raises(FeaturePackError, match="another SAE.*SAE digest .* != .*same shape, other weights"):
        loaded.check_compatible(other)
    old = make_pack()  # written before the digest was recorded: loads, checked on shapes, with a warning
    d = old.to_dict()
    d.pop("sae_digest")
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="records no SAE digest .*rediscover it"):
        FeaturePack.load(tmp_path / "old.json").check_compatible(other)


def test_digest_survives_a_dtype_cast_at_load(tmp_path):
    from qscope_rl import load_sae
    from qscope_rl.sae.identity import sae_digest

    folder = tmp_path / "SAE-Res-Tiny-W64-L0_4"
    folder.mkdir()
    torch.manual_seed(1)
    sae = SparseAutoencoder(16, 64, k=4, layer=2)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    torch.save({n: t for n, t in sae.state_dict().items() if n in ("W_enc", "W_dec", "b_enc", "b_dec")},
               folder / "layer2.sae.pt")
    assert sae_digest(load_sae(folder, layer=2, dtype=torch.bfloat16)) == sae_digest(load_sae(folder, layer=2))


def test_pack_is_written_atomically_and_a_truncated_one_is_named(tmp_path, monkeypatch):
    pack = make_pack()
    path = pack.save(tmp_path / "pack.json")
    good = path.read_text()

    def killed(self, *args, **kwargs):  # a kill mid-write: the temporary file is cut off, the rename never runs
        Path.write_bytes(self, b'{"format": "qscope')
        raise KeyboardInterrupt

    from pathlib import Path
    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        pack.save(path)
    monkeypatch.undo()
    assert path.read_text() == good and [p.name for p in tmp_path.iterdir()] == ["pack.json"]
    path.write_text(good[:40])
    with pytest.raises(FeaturePackError, match="not valid JSON.*truncated or corrupt"):
        FeaturePack.load(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(FeaturePackError, match="not UTF-8"):
        FeaturePack.load(path)
