"""Sparse capture gives what dense capture + encode_completions gives, and holds B x T x k, not B x T x d."""

import pytest
import torch
from peak_memory import peak_tensor_bytes
from tiny_models import HIDDEN, tiny_model
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder, capture_residual
from qscope_rl.features.detection import encode_completions
from qscope_rl.features.sparse_capture import SparseCapture, capture_sparse
from qscope_rl.hooks import decoder_layer

D_SAE, K, LAYER, PAD = 96, 6, 1, 0
TRACKED = [3, 17, 40, 95]


def random_sae(d_in=HIDDEN, d_sae=D_SAE, k=K, architecture="topk", seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_sae, d_in, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "W_dec": torch.randn(d_in, d_sae, generator=g), "b_dec": torch.zeros(d_in)}
    if architecture == "relu":
        weights["b_enc"] = weights["b_enc"] - 2.5  # a few features on per token, a different number per token
    return SparseAutoencoder.from_weights(weights, architecture=architecture, k=k, layer=LAYER)


def dense(values, indices, d_sae=D_SAE):
    """Scatter (..., k) codes into (..., d_sae): compares codes whatever their order within a token."""
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype).scatter_add_(-1, indices, values)


def assert_same_activations(got, ref):
    assert got.values.shape == ref.values.shape and got.indices.dtype == ref.indices.dtype == torch.long
    assert torch.equal(got.mask, ref.mask)
    assert_close(dense(got.values, got.indices), dense(ref.values, ref.indices))
    if ref.pre is None:
        assert got.pre is None and got.tracked_ids is None
    else:
        assert_close(got.pre, ref.pre)
        assert torch.equal(got.tracked_ids, ref.tracked_ids)
    assert got.d_sae == ref.d_sae


def lengths_mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture(scope="module")
def generation():
    """Left-padded prompts through HF generate, with dense and sparse capture on the same layer at once."""
    model = tiny_model("qwen3")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    P = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    attention = (torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    sae = random_sae()
    with torch.no_grad(), capture_residual(model, LAYER) as dense_cap, \
            capture_sparse(model, LAYER, sae, tracked_ids=TRACKED, chunk_tokens=4) as sparse_cap:
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=9, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None)
    return sae, dense_cap.chunks, sparse_cap, P, out.shape[1] - P


def test_generation_matches_dense_capture_then_encode_completions(generation):
    sae, chunks, sparse_cap, P, T = generation
    assert chunks[0].shape[1] == P and sparse_cap.sparse.start == P  # the prefill is the prompt
    joined = torch.cat(chunks, dim=1)  # (B, P + T - 1, d): the last sampled token is never fed back
    assert sparse_cap.captured_length == joined.shape[1] - P == T - 1
    mask = lengths_mask([T - 1, 3, 0], T - 1)  # a full row, an early EOS, an empty completion
    ref = encode_completions(sae, joined, mask, tracked_ids=TRACKED)
    got = sparse_cap.completion_activations(mask)
    assert_same_activations(got, ref)
    assert float(got.values[~got.mask].abs().sum()) == 0 and float(got.pre[~got.mask].abs().sum()) == 0
    # the completion grid may be wider than what was fed, as in the trainers (TRL pads completions to T)
    wide = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    ref_wide = encode_completions(sae, torch.cat([joined, joined.new_zeros(3, 2, HIDDEN)], 1), wide,
                                  tracked_ids=TRACKED)
    assert_same_activations(sparse_cap.completion_activations(wide), ref_wide)


def test_hook_removed_on_exit_and_on_error(generation):
    model = tiny_model("qwen3")
    layer = decoder_layer(model, LAYER)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_sparse(model, LAYER, random_sae()):
            assert len(layer._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


@pytest.mark.parametrize("split", [[7, 1, 1, 1, 1, 1], [3, 4, 2, 3], [12]])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
@pytest.mark.parametrize("tracked", [None, TRACKED])
def test_any_chunking_matches_encode_completions(split, chunk_tokens, tracked):
    torch.manual_seed(1)
    B, P, d = 4, 5, HIDDEN
    hidden = torch.randn(B, sum(split), d) * 2
    sae = random_sae()
    cap = SparseCapture(sae, tracked_ids=tracked, prompt_length=P, chunk_tokens=chunk_tokens)
    for piece in hidden.split(split, dim=1):  # the prompt may end inside a chunk (chunked prefill)
        cap.feed(piece)
    T = hidden.shape[1] - P
    mask = lengths_mask([T, 2, 0, 5], T)
    ref = encode_completions(sae, hidden, mask, prompt_length=P, tracked_ids=tracked)
    assert_same_activations(cap.completion_activations(mask), ref)
    codes = cap.result()  # every position from the prompt on, unmasked
    ref_all = sae.encode_sparse(hidden[:, P:])
    assert codes.start == P and codes.values.shape == (B, T, K)
    assert_close(dense(codes.values, codes.indices), dense(ref_all.values, ref_all.indices))
    # a later prompt_length reads a later slice of the same codes
    later = encode_completions(sae, hidden, mask[:, 2:], prompt_length=P + 2, tracked_ids=tracked)
    assert_same_activations(cap.completion_activations(mask[:, 2:], prompt_length=P + 2), later)


def test_relu_sae_without_k_pads_to_the_busiest_token():
    torch.manual_seed(2)
    sae = random_sae(architecture="relu", k=None)
    hidden = torch.randn(3, 9, HIDDEN)
    cap = SparseCapture(sae, prompt_length=2, chunk_tokens=3)
    for piece in hidden.split(1, dim=1):
        cap.feed(piece)
    mask = lengths_mask([7, 4, 1], 7)
    ref = encode_completions(sae, hidden, mask)
    got = cap.completion_activations(mask)
    assert got.values.shape[-1] >= ref.values.shape[-1]  # widest token of every fed row, not only masked ones
    assert_close(dense(got.values, got.indices), dense(ref.values, ref.indices))


def test_feature_ids_survive_narrow_storage():
    """Codes are stored as int16 for d_sae <= 32768: the top id 32767 must come back exactly."""
    d_in, d_sae = 4, 2**15
    W = torch.full((d_sae, d_in), -1.0)
    W[d_sae - 1], W[12345] = 1.0, 0.5  # the two features that fire on positive inputs
    sae = SparseAutoencoder.from_weights({"W_enc": W, "b_enc": torch.zeros(d_sae), "W_dec": W.T.contiguous(),
                                          "b_dec": torch.zeros(d_in)}, architecture="topk", k=2)
    cap = SparseCapture(sae, prompt_length=0)
    cap.feed(torch.ones(1, 3, d_in))
    acts = cap.completion_activations(torch.ones(1, 3, dtype=torch.bool))
    assert sorted(acts.indices[0, 0].tolist()) == [12345, d_sae - 1]
    assert_close(acts.feature_sum(torch.tensor([d_sae - 1])), torch.full((1, 3), 4.0))


def test_memory_grows_with_k_not_d():
    d_in, d_sae, k, B, T = 256, 1024, 8, 4, 50
    sae = random_sae(d_in=d_in, d_sae=d_sae, k=k)
    per_token = k * (4 + 2) + 2 * 4 + 1  # fp32 values, int16 ids, fp32 tracked, a "written" flag
    cap = SparseCapture(sae, tracked_ids=[1, 2], prompt_length=0, chunk_tokens=16, capacity=T)
    for _ in range(T):
        cap.feed(torch.randn(B, 1, d_in))
        assert cap.nbytes() <= B * T * per_token + 16 * d_in * 4  # the preallocated codes + at most one dense chunk
    cap.result()  # flushes the pending rows: only the codes stay
    assert cap.nbytes() == B * T * per_token < 0.06 * (B * T * d_in * 4)
    grown = SparseCapture(sae, prompt_length=0, chunk_tokens=16)  # no capacity given: the grid grows by doubling
    for _ in range(T):
        grown.feed(torch.randn(B, 1, d_in))
    grown.result()
    assert grown.store.shape == (B, 64, k) and grown.nbytes() == B * 64 * (k * (4 + 2) + 1)


def test_bad_input_is_refused_by_name():
    sae = random_sae()
    cap = SparseCapture(sae, prompt_length=2)
    with pytest.raises(ValueError, match="d_in=32"):
        cap.feed(torch.randn(2, 3, HIDDEN + 1))
    cap.feed(torch.randn(2, 3, HIDDEN))
    with pytest.raises(ValueError, match="batch 3 after chunks of batch 2"):
        cap.feed(torch.randn(3, 1, HIDDEN))
    with pytest.raises(ValueError, match="never fed"):
        cap.completion_activations(torch.ones(2, 2, dtype=torch.bool))  # only 1 position after the prompt
    with pytest.raises(ValueError, match="never encoded"):
        cap.completion_activations(torch.ones(2, 1, dtype=torch.bool), prompt_length=1)
    with pytest.raises(ValueError, match=r"\(B, T\) with B=2"):
        cap.completion_activations(torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="tracked_ids out of range"):
        SparseCapture(sae, tracked_ids=[D_SAE])
    with pytest.raises(ValueError, match="prompt_length must be >= 0"):
        SparseCapture(sae, prompt_length=-1)
    cap.reset()  # a new generation: the batch and positions start again
    cap.feed(torch.randn(3, 4, HIDDEN))
    assert cap.captured_length == 2


def test_reading_the_codes_costs_no_full_size_copies():
    """The read-out allocates its outputs and bounded blocks, not a full-size temporary of every code (an int64
    copy of the int16 ids and an advanced-indexing copy once made the sparse capture's peak 2x its outputs)."""
    d_in, d_sae, k, B, T = 16, 1024, 32, 32, 512
    sae = random_sae(d_in=d_in, d_sae=d_sae, k=k)
    cap = SparseCapture(sae, tracked_ids=[1, 2, 3], prompt_length=0, capacity=T)
    cap.feed(torch.randn(B, T, d_in))
    cap.result()  # everything encoded: only the read-out is measured below
    mask = torch.ones(B, T, dtype=torch.bool)
    read = []
    peak = peak_tensor_bytes(lambda: read.append(cap.completion_activations(mask)))
    acts = read[0]
    outputs = sum(t.numel() * t.element_size() for t in (acts.values, acts.indices, acts.pre))
    assert outputs <= peak <= 1.1 * outputs + 2**20
