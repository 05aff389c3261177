"""The pure token-reorganisation functions, on examples small enough to check by hand."""
import pytest
import torch

from timm_evit.reorg import (
    class_attention, num_kept_tokens, reorganize_tokens, tokens_to_patch_grid,
    trace_patch_token_index, trace_token_patch_ids,
)


@pytest.mark.parametrize('rate, n, expected', [
    (0.7, 196, 138), (0.7, 139, 98), (0.7, 100, 70), (0.5, 196, 98), (0.5, 51, 26),
    (1.0, 196, 196), (1e-9, 196, 1), (0.25, 4, 1),
])
def test_num_kept_tokens_is_float64_ceil(rate, n, expected):
    assert num_kept_tokens(rate, n) == expected   # ceil in Python float (float64), as the official code


def test_class_attention_is_row_zero_of_softmax_averaged_over_heads():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    scale = 0.5
    full = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)  # [B, H, N, N]
    expected = torch.stack([full[b, :, 0, 1:].mean(0) for b in range(2)])
    torch.testing.assert_close(class_attention(q, k, scale), expected)   # not renormalised


def test_reorganize_keeps_most_attentive_in_descending_order_and_fuses_the_rest():
    cls, t = torch.tensor([[9., 9.]]), torch.tensor([[1., 0.], [0., 1.], [2., 2.], [3., 0.]])
    x = torch.cat([cls, t])[None]                 # [1, 5, 2]
    a = torch.tensor([[0.1, 0.4, 0.2, 0.05]])     # token 1 most attentive, then 2
    out, kept = reorganize_tokens(x, a, num_keep=2, fuse_token=True)
    assert kept.tolist() == [[1, 2]]
    fused = 0.1 * t[0] + 0.05 * t[3]              # raw weights of the dropped tokens
    expected = torch.stack([cls[0], t[1], t[2], fused])[None]
    torch.testing.assert_close(out, expected)

    out, kept = reorganize_tokens(x, a, num_keep=2, fuse_token=False)
    torch.testing.assert_close(out, expected[:, :3])


def test_reorganize_handles_each_image_on_its_own():
    x = torch.randn(2, 4, 3)
    a = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    out, kept = reorganize_tokens(x, a, num_keep=1, fuse_token=True)
    assert kept.tolist() == [[0], [2]]
    torch.testing.assert_close(out[0, 1], x[0, 1])
    torch.testing.assert_close(out[1, 1], x[1, 3])
    torch.testing.assert_close(out[0, 2], 0.2 * x[0, 2] + 0.1 * x[0, 3])
    torch.testing.assert_close(out[1, 2], 0.1 * x[1, 1] + 0.2 * x[1, 2])


def test_trace_through_two_stages():
    # 6 patches. Stage 1 keeps patches 4, 1, 0 (fusing 2, 3, 5 into token 3 = F1).
    ids = torch.arange(6)[None]
    index = torch.arange(6)[None]
    kept1 = torch.tensor([[4, 1, 0]])
    ids = trace_token_patch_ids(ids, kept1, fused=True)
    index = trace_patch_token_index(index, kept1, num_tokens=6, fused=True)
    assert ids.tolist() == [[4, 1, 0, -1]]
    assert index.tolist() == [[2, 1, 3, 3, 0, 3]]
    # Stage 2 keeps F1 (token 3) and patch 0 (token 2); patches 4, 1 go into F2 = token 2.
    kept2 = torch.tensor([[3, 2]])
    ids = trace_token_patch_ids(ids, kept2, fused=True)
    index = trace_patch_token_index(index, kept2, num_tokens=4, fused=True)
    assert ids.tolist() == [[-1, 0, -1]]
    assert index.tolist() == [[1, 2, 0, 0, 2, 0]]


def test_trace_without_fusion_marks_dropped_patches():
    index = torch.arange(4)[None]
    index = trace_patch_token_index(index, torch.tensor([[2, 0]]), num_tokens=4, fused=False)
    assert index.tolist() == [[1, -1, 0, -1]]
    # tokens are now (patch 2, patch 0); keeping token 1 keeps patch 0 only
    index = trace_patch_token_index(index, torch.tensor([[1]]), num_tokens=2, fused=False)
    assert index.tolist() == [[0, -1, -1, -1]]


def test_tokens_to_patch_grid():
    tokens = torch.tensor([[[1., 1.], [2., 2.]]])
    grid = tokens_to_patch_grid(tokens, torch.tensor([[1, -1, 0]]))
    assert grid.tolist() == [[[2., 2.], [0., 0.], [1., 1.]]]
