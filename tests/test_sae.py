"""SparseAutoencoder math against naive references, sparse paths against dense ones."""

import pytest
import torch
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder

D_IN, D_SAE, K = 16, 64, 5


def random_weights(seed=0, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_in, d_sae, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
        "threshold": torch.rand(d_sae, generator=g),
    }


def naive_topk_encode(x, w, k):
    """Qwen-Scope model-card math, one token at a time."""
    out = torch.zeros(x.shape[0], w["W_enc"].shape[0])
    for n, token in enumerate(x):
        pre = w["W_enc"] @ token + w["b_enc"]
        for j in torch.argsort(pre, descending=True)[:k]:
            out[n, j] = max(float(pre[j]), 0.0)
    return out


def test_topk_encode_matches_naive_reference():
    w = random_weights()
    sae = SparseAutoencoder.from_weights(w, architecture="topk", k=K)
    x = torch.randn(7, D_IN)
    assert_close(sae.encode(x), naive_topk_encode(x, w, K))
    assert_close(sae.pre_acts(x), x @ w["W_enc"].T + w["b_enc"])
    assert_close(sae.decode(sae.encode(x)), sae.encode(x) @ w["W_dec"].T + w["b_dec"])


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "relu"])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_encode_sparse_matches_dense(architecture, chunk):
    sae = SparseAutoencoder.from_weights(random_weights(1), architecture=architecture,
                                         k=K if architecture == "topk" else None)
    x = torch.randn(2, 5, D_IN)
    sparse = sae.encode_sparse(x, chunk_tokens=chunk)
    assert sparse.values.shape[:2] == (2, 5) and sparse.indices.dtype == torch.long
    if architecture == "topk":
        assert sparse.values.shape[-1] == K
    assert_close(sparse.to_dense(D_SAE), sae.encode(x))
    assert_close(sae.decode_sparse(sparse), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([0, 7, 33])
    assert_close(sparse.features(ids), sae.encode(x)[..., ids])
    assert_close(sparse.feature(7), sae.encode(x)[..., 7])
    empty = sae.encode_sparse(x[:, :0], chunk_tokens=chunk)  # no tokens (an empty completion batch)
    assert empty.values.shape[:2] == (2, 0) and empty.indices.shape == empty.values.shape
    # the tracked variant: the same codes, and some features' pre-activations from the same matmul, with autograd
    leaf = x.clone().requires_grad_()
    tracked, pre = sae.encode_sparse_tracked(leaf, ids, chunk_tokens=chunk)
    assert_close(tracked.to_dense(D_SAE).detach(), sparse.to_dense(D_SAE))
    assert pre.shape == (2, 5, 3)
    assert_close(pre, sae.pre_acts(x)[..., ids])
    pre.sum().backward()
    assert_close(leaf.grad, sae.W_enc[ids].sum(0).expand_as(x))
    with pytest.raises(ValueError, match="out of range"):
        sae.encode_sparse_tracked(x, [D_SAE])
    empty_acts, empty_pre = sae.encode_sparse_tracked(x[:, :0], ids)
    assert empty_acts.values.shape[:2] == (2, 0) and empty_pre.shape == (2, 0, 3)


def test_jumprelu_and_relu_math():
    w = random_weights(2)
    x = torch.randn(4, D_IN)
    pre = x @ w["W_enc"].T + w["b_enc"]
    jump = SparseAutoencoder.from_weights(w, architecture="jumprelu")
    assert_close(jump.encode(x), pre * (pre > w["threshold"]))
    relu = SparseAutoencoder.from_weights(w, architecture="relu", apply_b_dec_to_input=True)
    assert_close(relu.encode(x), ((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]).relu())


def test_sae_is_frozen_and_stays_in_eval():
    sae = SparseAutoencoder.from_weights(random_weights(), architecture="topk", k=K)
    assert not any(p.requires_grad for p in sae.parameters())
    sae.train()
    assert not sae.training


def test_decoder_direction_and_fvu():
    w = random_weights()
    sae = SparseAutoencoder.from_weights(w, architecture="topk", k=K)
    assert_close(sae.decoder_direction(3), w["W_dec"][:, 3])
    assert_close(sae.decoder_direction(3, normalize=True).norm(), torch.tensor(1.0))
    with pytest.raises(IndexError, match="out of range"):
        sae.decoder_direction(D_SAE)
    # A full-width "topk" with identity-like weights reconstructs almost perfectly.
    eye = {"W_enc": torch.cat([torch.eye(D_IN), -torch.eye(D_IN)]), "b_enc": torch.zeros(2 * D_IN),
           "W_dec": torch.cat([torch.eye(D_IN), -torch.eye(D_IN)], 1), "b_dec": torch.zeros(D_IN)}
    perfect = SparseAutoencoder.from_weights(eye, architecture="topk", k=D_IN)
    assert perfect.fvu(torch.randn(50, D_IN)) < 1e-10


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("b_dec"), "missing"),
        (lambda w: w.update(W_dec=torch.zeros(D_IN + 1, D_SAE)), "W_dec has shape"),
        (lambda w: w["W_enc"].__setitem__((0, 0), float("nan")), "NaN or inf"),
        (lambda w: w.update(W_enc=torch.zeros(D_SAE)), "2-D"),
    ],
)
def test_bad_weights_are_rejected(change, message):
    w = random_weights()
    change(w)
    with pytest.raises(ValueError, match=message):
        SparseAutoencoder.from_weights(w, architecture="topk", k=K)


def test_bad_config_and_input_are_rejected():
    with pytest.raises(ValueError, match="k=65 must be in 1..d_sae=64"):
        SparseAutoencoder(D_IN, D_SAE, architecture="topk", k=65)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SparseAutoencoder(D_IN, D_SAE, architecture="gated")
    with pytest.raises(ValueError, match="needs k"):
        SparseAutoencoder(D_IN, D_SAE, architecture="topk")
    sae = SparseAutoencoder.from_weights(random_weights(), architecture="topk", k=K)
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode_sparse(torch.randn(3, D_IN + 1))


def test_from_weights_adopts_the_loaded_tensors_and_stays_frozen():
    weights = {"W_enc": torch.randn(64, 16), "b_enc": torch.zeros(64), "W_dec": torch.randn(16, 64),
               "b_dec": torch.zeros(16)}
    sae = SparseAutoencoder.from_weights(weights, architecture="topk", k=4)
    # no second copy of the SAE while loading: the module holds the loaded tensors themselves
    assert sae.W_enc.data_ptr() == weights["W_enc"].data_ptr()
    assert isinstance(sae.W_enc, torch.nn.Parameter) and not any(p.requires_grad for p in sae.parameters())
    half = SparseAutoencoder.from_weights(weights, architecture="topk", k=4, dtype=torch.bfloat16)
    assert half.W_dec.dtype == torch.bfloat16


def test_memory_bounded_chunk_keeps_encode_buffers_under_five_percent_of_the_weights():
    weights = random_weights(d_in=512, d_sae=4096)
    sae = SparseAutoencoder.from_weights({k: v for k, v in weights.items() if k != "threshold"},
                                         architecture="topk", k=8)
    buffers = lambda chunk: 2 * chunk * sae.d_sae * 4  # noqa: E731  pre-activations + top-k workspace, bytes
    weight_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
    assert sae.memory_bounded_chunk(floor_bytes=0) == 25  # 5% of d_in
    assert buffers(25) <= 0.05 * weight_bytes
    assert buffers(sae.memory_bounded_chunk(floor_bytes=2**20)) <= 2**20  # a tiny SAE may use the floor
    x = torch.randn(100, 512)
    assert torch.equal(sae.encode_sparse(x, chunk_tokens=25).indices.sort(-1).values,
                       sae.encode_sparse(x).indices.sort(-1).values)
