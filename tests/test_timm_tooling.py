"""What timm's tools and timm users do to a model beyond calling it: hooks on blocks, running
``model.blocks`` alone, masks in the forward signature, the meta device and factory dtypes, FX
tracing, pruning, TorchScript. Each is checked against timm's own plain model where one exists."""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from helpers import TINY_DEIT, tiny_evit

EVIT_MODELS = ['evit_deit_tiny', 'evit_deit_small', 'evit_deit_base', 'evit_lvvit_s', 'evit_lvvit_m']


def plain_deit_like(model):
    """timm's plain DeiT with the tiny architecture and ``model``'s weights."""
    plain = timm.create_model('deit_tiny_patch16_224', embed_dim=48, depth=4, num_heads=2).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def test_forward_hooks_on_blocks_receive_tensors_of_each_blocks_size():
    model = tiny_evit(keep_rate=0.5).eval()      # reorganising in blocks 1 and 2, with fusion
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda module, args, output, i=i: seen.__setitem__(i, output))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert all(isinstance(out, torch.Tensor) for out in seen.values())
    # 196 patches -> ceil(98) + 1 fused after block 1 -> ceil(49.5) + 1 after block 2
    assert [tuple(seen[i].shape) for i in range(4)] == [(2, 197, 48), (2, 100, 48), (2, 52, 48), (2, 52, 48)]


def test_model_blocks_run_on_tokens_with_the_models_keep_rates():
    model = tiny_evit(keep_rate=(0.9, 0.5)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))   # timm's own steps
        out = model.blocks(tokens)
        torch.testing.assert_close(model.norm(out), model.forward_features(x), rtol=0, atol=0)
    assert out.shape == (2, 1 + 89 + 1, 48)      # 196 -> 177 + 1 -> ceil(0.5 * 178) + 1
    model.keep_rate = 1.0                        # the blocks follow the model's keep rate (set_keep_rate)
    assert [blk.keep_rate for blk in model.blocks] == [1.0] * 4
    with torch.no_grad():
        torch.testing.assert_close(model.blocks(tokens), plain_deit_like(model).blocks(tokens), rtol=0, atol=0)


def test_attn_mask_and_is_causal_reach_attention_at_keep_rate_one():
    model = tiny_evit(keep_rate=1.0).eval()
    plain = plain_deit_like(model)
    x = torch.randn(2, 3, 224, 224)
    mask = torch.rand(2, 1, 197, 197) > 0.3
    mask[..., 0] = True                          # every query sees at least the class token
    with torch.no_grad():
        for kwargs in (dict(attn_mask=mask), dict(is_causal=True)):
            masked = model(x, **kwargs)
            torch.testing.assert_close(masked, plain(x, **kwargs), rtol=0, atol=0)
            assert not torch.allclose(masked, model(x))    # the mask did reach attention
            torch.testing.assert_close(model.forward_features(x, **kwargs), plain.forward_features(x, **kwargs),
                                       rtol=0, atol=0)
            ours = model.forward_intermediates(x, indices=[1, 3], output_fmt='NLC', intermediates_only=True, **kwargs)
            theirs = plain.forward_intermediates(x, indices=[1, 3], output_fmt='NLC', intermediates_only=True,
                                                 **kwargs)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_mask_with_reorganisation_is_refused_with_the_reason():
    model = tiny_evit(keep_rate=0.7).eval()
    x = torch.randn(1, 3, 224, 224)
    for call in (model, model.forward_features, model.forward_intermediates):
        for kwargs in (dict(attn_mask=torch.ones(1, 1, 197, 197, dtype=torch.bool)), dict(is_causal=True)):
            with pytest.raises(ValueError, match='attn_mask / is_causal need keep_rate=1.0'):
                call(x, **kwargs)
    with torch.no_grad():   # ... and a one-call keep_rate=1.0 makes them usable
        assert model(x, attn_mask=torch.ones(1, 1, 197, 197, dtype=torch.bool), keep_rate=1.0).shape == (1, 1000)


def test_get_intermediate_layers_as_dino_users_call_it():
    model = tiny_evit(keep_rate=0.5).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2)
        nlc = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        grids = model.get_intermediate_layers(x, n=2, reshape=True, norm=True)
    # DINO's interface over forward_intermediates: the last n blocks, NLC or (reshape) on the grid
    assert len(last_two) == 2
    for ours, expected in zip(last_two, nlc[2:]):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with torch.no_grad():
        expected_grids = model.forward_intermediates(x, indices=[2, 3], norm=True, intermediates_only=True)
    assert [g.shape for g in grids] == [(2, 48, 14, 14)] * 2
    for ours, expected in zip(grids, expected_grids):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', EVIT_MODELS)
def test_meta_device_and_factory_dtype(name):
    model = timm.create_model(name, device='meta', dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    out = model(torch.randn(2, 3, 224, 224, device='meta', dtype=torch.bfloat16))
    assert out.shape == (2, 1000) and out.device.type == 'meta' and out.dtype == torch.bfloat16
    model.reset_classifier(10)
    assert {p.device.type for p in model.parameters()} == {'meta'}


def test_factory_dtype_runs_for_real():
    for name, kwargs in [('evit_deit_tiny', dict(TINY_DEIT)), ('evit_lvvit_s', dict(depth=3, reorg_layers=(1,)))]:
        model = timm.create_model(name, dtype=torch.float64, keep_rate=0.5, **kwargs).eval()
        single = timm.create_model(name, keep_rate=0.5, **kwargs).eval()
        single.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
        with torch.no_grad():
            out = model(x)
            assert out.dtype == torch.float64
            torch.testing.assert_close(out.float(), single(x.float()), rtol=1e-4, atol=1e-4)


def fx_feature_extractor(model, train=False):
    """timm's FX feature extraction (its leaf modules and wrapped functions), returning the output."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('name', ['evit_deit_small', 'evit_lvvit_s', 'evit_lvvit_m'])
def test_fx_traced_forward_equals_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        traced = fx_feature_extractor(model)
        (out,) = traced(x).values()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['evit_deit_tiny', 'evit_lvvit_s'])
def test_fx_traced_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42, depth=4, reorg_layers=(1, 2), keep_rate=0.5).train()
    traced = fx_feature_extractor(model, train=True)
    (out,) = traced(torch.randn(2, 3, 224, 224)).values()
    assert out.shape == (2, 42)
    out.mean().backward()
    assert [n for n, p in traced.named_parameters() if p.grad is None] == []


def test_prune_intermediate_layers_keeps_only_existing_reorganising_blocks():
    model = tiny_evit(depth=12, reorg_layers=(3, 6, 9), keep_rate=(0.9, 0.7, 0.5)).eval()
    x = torch.randn(1, 3, 224, 224)
    early = tiny_evit(depth=12, reorg_layers=(3, 6, 9)).eval()
    early.prune_intermediate_layers(indices=[1])
    assert len(early.blocks) == 2 and early.reorg_layers == () and early.keep_rate == ()
    plain = timm.create_model('deit_tiny_patch16_224', embed_dim=48, depth=12, num_heads=2).eval()
    plain.load_state_dict(early.state_dict(), strict=False)
    plain.prune_intermediate_layers(indices=[1])
    with torch.no_grad():   # no reorganising block left: timm's pruned DeiT exactly
        torch.testing.assert_close(early.forward_intermediates(x, intermediates_only=True),
                                   plain.forward_intermediates(x, intermediates_only=True), rtol=0, atol=0)
        torch.testing.assert_close(early(x), plain(x), rtol=0, atol=0)    # pruned head, as timm's

    model.prune_intermediate_layers(indices=[6])
    assert len(model.blocks) == 7 and model.reorg_layers == (3, 6) and model.keep_rate == (0.9, 0.7)
    with torch.no_grad():
        tokens = model.forward_intermediates(x, indices=[3, 6], output_fmt='NLC', intermediates_only=True)
    assert [t.shape[1] for t in tokens] == [177 + 1, 125 + 1]     # ceil(.9 * 196) + 1, ceil(.7 * 178) + 1
    model.set_keep_rate(0.5)                                      # one rate per remaining block
    assert model.keep_rate == (0.5, 0.5)


@pytest.mark.parametrize('name', ['evit_deit_tiny', 'evit_lvvit_s'])
def test_torchscript_is_refused_with_what_to_use_instead(name):
    model = timm.create_model(name, depth=2, reorg_layers=(1,))
    with pytest.raises(RuntimeError, match=r'torch\.export.*ONNX'):
        torch.jit.script(model)
