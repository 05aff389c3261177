"""torch.fx's own symbolic_trace keeps EViT's shape-dependent steps whole (the opaque module), and
forward_intermediates says what it needs when patch dropout leaves no full patch grid."""
import pytest
import timm
import torch

import timm_evit  # noqa: F401


@pytest.mark.parametrize('name', ['evit_deit_tiny', 'evit_lvvit_s'])
def test_plain_symbolic_trace_equals_eager(name):
    model = timm.create_model(name, depth=4, reorg_layers=(1, 2), keep_rate=0.5).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    leaves = {getattr(node.target, '__name__', '') for node in traced.graph.nodes if node.op == 'call_function'}
    assert {'check_image_batch', 'check_attention_mask'} <= leaves


def test_nchw_intermediates_under_patch_dropout_are_refused_naming_the_way_out():
    model = timm.create_model('evit_deit_tiny', depth=4, reorg_layers=(1, 2), patch_drop_rate=0.5).train()
    x = torch.randn(2, 3, 224, 224)
    with pytest.raises(ValueError, match=r"output_fmt='NCHW' needs every patch of the 14x14 grid.*got 98.*'NLC'"):
        model.forward_intermediates(x)
    tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    # 98 patches enter; block 1 keeps ceil(0.7 * 98) = 69 and fuses the rest; block 2 keeps ceil(0.7 * 70) = 49
    assert [t.shape[1] for t in tokens] == [98, 70, 50, 50]
    model.eval()     # timm's patch dropout is off in evaluation: the full grid again
    assert model.forward_intermediates(x, intermediates_only=True)[3].shape == (2, 192, 14, 14)
