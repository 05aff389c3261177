"""An evit model is a timm model in every way timm's tools use one (docs/design.md, "The timm contract")."""
import copy

import pytest
import timm
import timm.optim
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

from evit_reference import kept_indices_by_block
from helpers import FAMILIES, TINY_DEIT, converted, family_params, images, tiny_evit


@pytest.mark.parametrize('name, dim', [('evit_deit_tiny', 192), ('evit_deit_small', 384), ('evit_deit_base', 768)])
def test_registered_architectures_match_deit_shapes(name, dim):
    assert name in timm.list_models('evit_*')
    assert f'{name}.fb_in1k' in timm.list_pretrained('evit_*')
    model = timm.create_model(name)
    deit = timm.create_model(name.replace('evit_', '') + '_patch16_224')
    assert model.embed_dim == dim and len(model.blocks) == 12
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in deit.state_dict().items()}
    assert model.keep_rate == (0.7, 0.7, 0.7) and model.reorg_layers == (3, 6, 9) and model.fuse_token is True


def test_pretrained_cfg_is_deits():
    model = timm.create_model('evit_deit_small')
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == 'timm/deit_small_patch16_224.fb_in1k'
    assert cfg['architecture'] == 'evit_deit_small' and cfg['tag'] == 'fb_in1k'
    data = resolve_data_config({}, model=model)
    assert data == dict(input_size=(3, 224, 224), interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                        std=IMAGENET_DEFAULT_STD, crop_pct=0.9, crop_mode='center')


def test_model_kwargs_as_train_py_passes_them():
    # train.py --model-kwargs keep_rate=0.6 fuse_token=False reorg_layers="(2, 5, 8)" (literal_eval'd)
    model = timm.create_model('evit_deit_tiny', keep_rate=0.6, fuse_token=False, reorg_layers=(2, 5, 8))
    assert model.keep_rate == (0.6,) * 3 and not model.fuse_token and model.reorg_layers == (2, 5, 8)
    per_block = timm.create_model('evit_deit_tiny', keep_rate=(0.9, 0.8, 0.7))
    assert per_block.keep_rate == (0.9, 0.8, 0.7)


def test_set_keep_rate_and_per_call_override():
    model = tiny_evit(keep_rate=1.0).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        full = model(x)
        half = model(x, keep_rate=0.5)
        assert model.keep_rate == (1.0, 1.0)           # the override did not stick
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
        model.set_keep_rate(0.5)
        torch.testing.assert_close(model(x), half, rtol=0, atol=0)
        assert model.forward_features(x).shape[1] == 1 + 50 + 1   # 196 -> 98 + 1 fused -> 50 + 1 fused
        model.set_keep_rate([1.0, 0.5])
        assert model.forward_features(x).shape[1] == 1 + 98 + 1


def test_forward_features_head_and_reset_classifier():
    model = tiny_evit(keep_rate=0.5).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 50 + 1, 48)  # 196 -> 98 + fused -> 50 + fused
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats[:, 0])       # class token pooling, as DeiT
        torch.testing.assert_close(model.forward_head(feats), feats[:, 0] @ model.head.weight.T + model.head.bias)
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.num_classes == 10
        model.reset_classifier(0)
        assert model(x).shape == (2, 48)
    assert timm.create_model('evit_deit_tiny', num_classes=5, **TINY_DEIT)(x).shape == (2, 5)


def test_no_weight_decay_and_group_matcher_drive_timm_optimizers():
    model = tiny_evit()
    assert {'pos_embed', 'cls_token'} <= model.no_weight_decay()
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == len(model.blocks) + 2       # stem, each block, head
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay


def _patches_carried_by_hand(kept, num_patches, num_blocks, fuse, b):
    """After each block, for image ``b``: every token's set of patches and whether it is a fused token,
    followed with plain Python from the kept indices alone."""
    tokens = [({p}, False) for p in range(num_patches)]
    stages = []
    for i in range(num_blocks):
        if i in kept:
            keep = kept[i][b].tolist()
            dropped = [t for j, t in enumerate(tokens) if j not in keep]
            tokens = [tokens[j] for j in keep]
            if fuse:
                tokens.append((set().union(*(patches for patches, _ in dropped)), True))
        stages.append(list(tokens))
    return stages


def _grid_checks(model, x, fuse):
    out = model.forward_intermediates(x, output_dict=True)
    nlc = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    _, kept = kept_indices_by_block(model, x)
    grid_h, grid_w = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    num_patches = grid_h * grid_w
    for b in range(x.shape[0]):
        stages = _patches_carried_by_hand(kept, num_patches, len(model.blocks), fuse, b)
        for grid, tokens, ids, index, by_hand in zip(
                out['image_intermediates'], nlc, out['token_patch_ids'], out['patch_token_index'], stages):
            assert grid.shape == (x.shape[0], model.embed_dim, grid_h, grid_w)
            flat = grid.flatten(2).transpose(1, 2)
            assert ids[b].tolist() == [-1 if is_fused else min(patches) for patches, is_fused in by_hand]
            carrier = {p: t for t, (patches, _) in enumerate(by_hand) for p in patches}
            for p in range(num_patches):
                if p in carrier:   # the patch shows the token that carries it (its own, or the fused one)
                    assert index[b, p] == carrier[p]
                    torch.testing.assert_close(flat[b, p], tokens[b, carrier[p]], rtol=0, atol=0)
                else:              # dropped without fusion: zeros
                    assert not fuse and index[b, p] == -1 and not flat[b, p].any()
    return out


@pytest.mark.parametrize('fuse', [True, False])
def test_forward_intermediates_keeps_timm_shapes_and_maps_tokens_to_patches(fuse):
    model = tiny_evit(keep_rate=0.5, fuse_token=fuse, reorg_layers=(0, 1, 2)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = _grid_checks(model, x, fuse)
        torch.testing.assert_close(out['image_features'], model.forward_features(x))
        final, inter = model.forward_intermediates(x, indices=[1, 3], return_prefix_tokens=True)
        assert len(inter) == 2 and inter[0][1].shape == (2, 1, 48)
        nlc = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        assert [t.shape[1] for t in nlc] == ([99, 51, 27, 27] if fuse else [98, 49, 25, 25])


def test_features_only_and_fx_feature_extraction():
    x = torch.randn(1, 3, 224, 224)
    features = timm.create_model('evit_deit_tiny', features_only=True, out_indices=(3, 6, 9), **{**TINY_DEIT, 'depth': 12, 'reorg_layers': (3, 6, 9)})
    assert [f.shape for f in features(x)] == [(1, 48, 14, 14)] * 3
    model = tiny_evit(keep_rate=0.5).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes=['blocks.1', 'norm', 'head'])
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out['head'], model(x))
        assert out["norm"].shape == (1, 1 + 50 + 1, 48)


def test_other_img_size_and_dynamic_img_size():
    model = tiny_evit(img_size=288, keep_rate=0.7).eval()  # 18 x 18 = 324 patches
    x = torch.randn(1, 3, 288, 288)
    tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    assert [t.shape[1] for t in tokens] == [324, 228, 161, 161]  # ceil(.7 * 324) + 1, ceil(.7 * 228) + 1

    dynamic = tiny_evit(dynamic_img_size=True, keep_rate=0.5).eval()
    plain = timm.create_model('deit_tiny_patch16_224', dynamic_img_size=True, embed_dim=48, depth=4, num_heads=2).eval()
    plain.load_state_dict(dynamic.state_dict())
    with torch.no_grad():
        for size in [(224, 224), (288, 288), (160, 256)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(dynamic(x, keep_rate=1.0), plain(x), rtol=0, atol=0)
            assert dynamic(x).shape == (2, 1000)
        _grid_checks(dynamic, torch.randn(1, 3, 160, 256), fuse=True)


def test_backward_reaches_every_parameter_with_and_without_fusion():
    for fuse in (True, False):
        model = tiny_evit(keep_rate=0.5, fuse_token=fuse).train()
        model(torch.randn(2, 3, 224, 224)).logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert model.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize('reentrant', [False, True])
def test_grad_checkpointing_gives_the_same_outputs_and_grads(reentrant):
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
    model = tiny_evit(keep_rate=0.5).train()
    x = torch.randn(2, 3, 224, 224)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)   # timm's switch between torch's two checkpoint implementations
    try:
        out = model(x)
        out.sum().backward()
    finally:
        set_reentrant_ckpt(previous)
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_bf16_autocast():
    model = tiny_evit(keep_rate=0.7).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    # bf16 rounding must stay well below what tells two images apart (a wrong image's logits fail)
    assert (out.float() - ref).abs().max() < 0.25 * (ref[0] - ref[1]).abs().max()


def test_torch_compile_fullgraph_in_eval():
    model = tiny_evit(keep_rate=0.5).eval()
    x = torch.randn(2, 3, 224, 224)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_export():
    # torch.export is the supported way to ship a graph (torch.jit.script is deprecated in torch 2.14).
    model = tiny_evit(keep_rate=0.5).eval()
    x = torch.randn(2, 3, 224, 224)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


# ---- timm's own model suite as a contract (issue 30, item 9) --------------------------------------
# Each test below is one of timm's tests/test_models.py checks, on a small model, so that this suite
# does not depend on timm's test files.

def _unused_parameters_after_training_step(model, x, take_indices):
    """timm's pruning contract: a training step through the pruned model's taps and features reaches
    every parameter (as DistributedDataParallel without find_unused_parameters needs)."""
    model.train()
    taps = model.forward_intermediates(x, indices=take_indices, intermediates_only=True)
    sum(t.sum() for t in taps + [model.forward_features(x)]).backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize('family', family_params(['siglip', 'pe_map']))
@pytest.mark.parametrize('prune_norm', [False, True])
def test_pruned_pool_ranked_model_uses_every_parameter_it_keeps(family, prune_norm):
    # pruning the head of a 'pool' model keeps what its remaining blocks rank with, and only that:
    # the pool's output projection, norm and MLP rank nothing
    _, model = converted(family, 0.5, True)
    assert model.score == 'pool'
    x = images(FAMILIES[family].size)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    for index in range(len(model.blocks)):
        pruned = copy.deepcopy(model)
        take_indices = pruned.prune_intermediate_layers([index], prune_norm=prune_norm)
        with torch.no_grad():   # the ranking, and so the tap, is the unpruned model's
            assert torch.equal(pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)[0],
                               taps[index])
        unused = _unused_parameters_after_training_step(pruned, x, take_indices)
        assert not unused, f'pruned to block {index}: {unused}'


def test_pruning_again_below_every_reorganising_block_keeps_no_ranking_module():
    # a second pruning that leaves no reorganising block leaves nothing to rank with
    _, model = converted('siglip', 0.5, True)
    model.prune_intermediate_layers([3], prune_norm=True)
    assert {'score_pool', 'score_norm'} <= set(model._modules)
    take_indices = model.prune_intermediate_layers([0], prune_norm=True)
    assert model.reorg_layers == () and not {'score_pool', 'score_norm'} & set(model._modules)
    assert not _unused_parameters_after_training_step(model, images(FAMILIES['siglip'].size), take_indices)


def test_a_pruned_pool_model_whose_score_changes_keeps_no_ranking_module():
    # after pruning, score_pool / score_norm serve 'pool' alone: another score leaves them unused
    _, model = converted('siglip', 0.5, True)
    take_indices = model.prune_intermediate_layers([3], prune_norm=True)
    model.score = 'mean'
    assert not {'score_pool', 'score_norm'} & set(model._modules)
    assert not _unused_parameters_after_training_step(model, images(FAMILIES['siglip'].size), take_indices)
    with pytest.raises(ValueError, match="'pool'"):   # what it ranked with is gone: said, not guessed
        model.score = 'pool'


@pytest.mark.parametrize('name, size', [('evit_deit_tiny', (160, 192)), ('evit_deit_tiny_distilled_patch16_224', (160, 192)),
                                        ('evit_eva02_tiny_patch14_224', (168, 196))])
def test_fx_feature_extraction_with_dynamic_img_size(name, size):
    # timm's test_model_forward_fx on evit_test_vit (dynamic_img_size=True): timm's _pos_embed resamples
    # the position embedding with a function FX must keep whole, as it does when timm's model is traced
    model = timm.create_model(name, dynamic_img_size=True, embed_dim=48, depth=4, num_heads=2).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes=['norm'])
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['norm'], model.forward_features(x))
    with torch.no_grad():   # plain torch.fx too
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
