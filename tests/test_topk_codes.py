"""The blocked CPU top-k is torch.topk: same values, same features (no ties), and encode_sparse is unchanged."""

import pytest
import torch
from torch.testing import assert_close

from qscope_rl import SparseAutoencoder
from qscope_rl.sae.autoencoder import topk_codes


def as_sets(values, indices):
    order = indices.argsort(-1)
    return values.gather(-1, order), indices.gather(-1, order)


@pytest.mark.parametrize("rows,width,k,block", [(37, 4096, 16, 64), (5, 32768, 50, 64), (8, 2048, 8, 32)])
def test_blocked_topk_is_torch_topk(rows, width, k, block):
    g = torch.Generator().manual_seed(width)
    # a shared per-feature offset makes some blocks hot, so the top k cluster in few blocks (the hard case)
    pre = torch.randn(rows, width, generator=g) + 3 * torch.randn(width, generator=g).clamp(min=0)
    got, ref = topk_codes(pre, k, block), pre.topk(k, dim=-1, sorted=False)
    assert_close(as_sets(*got), as_sets(*ref), rtol=0, atol=0)
    assert torch.equal(pre.gather(1, got[1]), got[0])


def test_all_top_features_in_one_block():
    pre = torch.full((2, 4096), -1.0)
    pre[0, 128:148] = torch.arange(20.0)  # the 16 largest all sit in block 2 (block 64)
    pre[1, -16:] = 5.0 + torch.arange(16.0)
    got, ref = topk_codes(pre, 16, 64), pre.topk(16, dim=-1, sorted=False)
    assert_close(as_sets(*got), as_sets(*ref), rtol=0, atol=0)


def test_ties_give_the_same_values():
    pre = torch.zeros(3, 4096)  # every feature ties: values agree, the chosen features may not
    got, ref = topk_codes(pre, 10, 64), pre.topk(10, dim=-1, sorted=False)
    assert torch.equal(got[0], ref[0]) and all(len(set(row)) == 10 for row in got[1].tolist())


def test_falls_back_where_blocks_do_not_fit():
    pre = torch.randn(4, 96)  # 96 is not a multiple of 64: torch.topk itself
    assert torch.equal(topk_codes(pre, 6)[1], pre.topk(6, dim=-1, sorted=False)[1])


def test_encode_sparse_same_with_and_without_blocks():
    torch.manual_seed(0)
    sae = SparseAutoencoder(64, 8192, k=32)
    with torch.no_grad():
        sae.W_enc.normal_(std=64**-0.5)
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(300, 64)
    blocked = sae.encode_sparse(x, chunk_tokens=128)
    sae.topk_block = None
    plain = sae.encode_sparse(x, chunk_tokens=128)
    assert_close(as_sets(*blocked), as_sets(*plain), rtol=0, atol=0)
