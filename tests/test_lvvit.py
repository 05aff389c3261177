"""EViT-LV-ViT against an independent plain LV-ViT reference, official checkpoints, timm contract."""
import re
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F

from evit_reference import _linear, most_attentive_first, reference_tokens
from helpers import compare_with_reference, lvvit_official_layout, randomised_lvvit, save_official_lvvit
from timm_evit.tools.bench import run_bench
from timm_evit.evit_lvvit import _mix_tokens, _unmix_grid


def lvvit_patch_tokens(sd, image):
    """Token Labeling's stem for one image: 3 x (conv, eval BatchNorm, ReLU), then a patch/2 projection."""
    x = image[None]
    for i, (stride, pad) in enumerate([(2, 3), (1, 1), (1, 1)], start=1):
        x = F.conv2d(x, sd[f'patch_embed.conv{i}.weight'], stride=stride, padding=pad)
        mean, var = sd[f'patch_embed.bn{i}.running_mean'], sd[f'patch_embed.bn{i}.running_var']
        x = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
        x = torch.relu(x * sd[f'patch_embed.bn{i}.weight'][:, None, None] + sd[f'patch_embed.bn{i}.bias'][:, None, None])
    w = sd['patch_embed.proj.weight']
    x = F.conv2d(x, w, sd['patch_embed.proj.bias'], stride=w.shape[-1])
    return x.flatten(2)[0].T


def reference_lvvit_logits(official_sd, image, num_heads, keep_rates, fuse_token, choose=most_attentive_first):
    tokens, _, _, is_fused = reference_tokens(
        official_sd, lvvit_patch_tokens(official_sd, image), num_heads, keep_rates, fuse_token, eps=1e-5, skip_lam=2.,
        choose=choose)
    aux = [_linear(tokens[1 + j], official_sd, 'aux_head') for j in range(tokens.shape[0] - 1) if not is_fused[j]]
    return _linear(tokens[0], official_sd, 'head') + 0.5 * torch.stack(aux).max(0).values


# The official key names (tlt/models/lvvit.py, layers.py), written out: what a release file holds.
def official_keys(depth):
    keys = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
            'norm.weight', 'norm.bias', 'head.weight', 'head.bias', 'aux_head.weight', 'aux_head.bias']
    for i in (1, 2, 3):
        keys.append(f'patch_embed.conv{i}.weight')
        keys += [f'patch_embed.bn{i}.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
    for b in range(depth):
        keys += [f'blocks.{b}.{n}' for n in (
            'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias',
            'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')]
    return set(keys)


@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('keep_rate', [1.0, 0.7, 0.5])
def test_logits_match_plain_lvvit_reference(keep_rate, fuse_token):
    model = randomised_lvvit(keep_rate=keep_rate, fuse_token=fuse_token)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    sd = lvvit_official_layout(model)
    assert set(sd) == official_keys(16)
    rates = dict(zip((4, 8, 12), model.keep_rate))
    # the model's selection, adopted where the reference's own attention agrees up to near-ties
    compare_with_reference(model, images, lambda b, choose: reference_lvvit_logits(sd, images[b], 6, rates, fuse_token,
                                                                                   choose))


def test_parameter_counts_are_the_official_ones():
    assert round(sum(p.numel() for p in timm.create_model('evit_lvvit_s').parameters()) / 1e6, 2) == 26.15
    assert round(sum(p.numel() for p in timm.create_model('evit_lvvit_m').parameters()) / 1e6, 2) == 55.83


def test_defaults_and_train_mode_output():
    m = timm.create_model('evit_lvvit_m')
    assert m.reorg_layers == (5, 10, 15) and m.keep_rate == (0.7,) * 3 and m.fuse_token
    assert m.pretrained_cfg['crop_pct'] == 1.0 and m.pretrained_cfg['tag'] == 'tl_in1k'
    model = randomised_lvvit(keep_rate=0.5).train()
    x = torch.randn(2, 3, 224, 224)
    for m in model.modules():   # BatchNorm on running statistics, so that the reference can follow
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)   # what timm's losses take
    # training combines the heads as evaluation does: class head + 0.5 max over patch tokens' aux head
    sd = lvvit_official_layout(model)
    # the same selection (no dropout, BatchNorm on running statistics), the logits of this training forward
    compare_with_reference(model, x, lambda b, choose: reference_lvvit_logits(sd, x[b], 6, {4: .5, 8: .5, 12: .5}, True,
                                                                              choose), logits=out)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        feats = model.eval().forward_features(x)
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])


def test_fused_tokens_are_left_out_of_the_auxiliary_max():
    model = randomised_lvvit()
    tokens = torch.randn(1, 4, 384)
    with torch.no_grad():
        model.aux_head.weight.zero_()
        model.aux_head.bias.zero_()
        model.aux_head.weight[7] = tokens[0, 3] * 100              # token 3 votes hard for class 7
        ids = torch.tensor([[5, 9, -1]])                         # ...but token 3 is a fused token
        with_fused = model.forward_head(tokens, token_patch_ids=torch.tensor([[5, 9, 11]]))   # were it a patch
        without = model.forward_head(tokens, token_patch_ids=ids)
        # tokens whose ids are unknown, in a model that fuses: refused, not guessed
        with pytest.raises(ValueError, match='forward_head needs the token state'):
            model.forward_head(tokens)
        feats, feats_ids = model.forward_features(torch.randn(2, 3, 224, 224), return_token_patch_ids=True)
        torch.testing.assert_close(model.forward_head(feats), model.forward_head(feats, token_patch_ids=feats_ids),
                                   rtol=0, atol=0)
        cls = model.head(tokens[:, 0])
    assert with_fused[0, 7] - cls[0, 7] == pytest.approx(0.5 * float(tokens[0, 3] @ tokens[0, 3] * 100), rel=1e-4)
    # without the fused token, the max is over the two patch tokens' votes
    votes = [float(tokens[0, 3] @ tokens[0, j]) * 100 for j in (1, 2)]
    assert without[0, 7] - cls[0, 7] == pytest.approx(0.5 * max(votes), rel=1e-4)
    assert without[0, 7] < with_fused[0, 7]


def test_dense_output_mode():
    model = randomised_lvvit(keep_rate=0.5, dense_output=True).train()
    cls, aux, bbox = model(torch.randn(2, 3, 224, 224))
    assert cls.shape == (2, 1000) and aux.shape == (2, 196, 1000) and bbox == (0, 0, 0, 0)
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)    # eval: the usual prediction
    with pytest.raises(ValueError, match='mix_token=True needs dense_output=True'):
        timm.create_model('evit_lvvit_s', mix_token=True)
    with pytest.raises(ValueError, match='dense_output=True needs patch_drop_rate=0'):
        timm.create_model('evit_lvvit_s', dense_output=True, patch_drop_rate=0.1)


def test_mix_token_box_is_undone_on_the_grid():
    torch.manual_seed(5)
    tokens = torch.randn(3, 1 + 14 * 14, 8)
    mixed, (y1, x1, y2, x2) = _mix_tokens(tokens, 14, 14)
    grid, mixed_grid = tokens[:, 1:].reshape(3, 14, 14, 8), mixed[:, 1:].reshape(3, 14, 14, 8)
    assert torch.equal(mixed[:, 0], tokens[:, 0])
    assert torch.equal(mixed_grid[:, y1:y2, x1:x2], grid.flip(0)[:, y1:y2, x1:x2])
    inside = torch.zeros(14, 14, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert torch.equal(mixed_grid[:, ~inside], grid[:, ~inside])
    assert torch.equal(_unmix_grid(mixed[:, 1:], (y1, x1, y2, x2), 14, 14), tokens[:, 1:])


@pytest.mark.parametrize('nesting, prefix', [('state_dict', 'module.'), ('model', ''), ('state_dict_ema', '')])
def test_official_release_file_loads_through_pretrained_cfg_overlay(tmp_path, nesting, prefix):
    source = randomised_lvvit(seed=2)
    path = tmp_path / 'lvvit_s-26M-224-83.3.pth.tar'
    save_official_lvvit(path, source, nesting, prefix)
    model = timm.create_model('evit_lvvit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    big = timm.create_model('evit_lvvit_s', pretrained=True, img_size=288, pretrained_cfg_overlay=dict(file=str(path)))
    assert big.pos_embed.shape == (1, 1 + 18 * 18, 384)


def test_bad_checkpoints_fail_clearly(tmp_path):
    source = randomised_lvvit(seed=2)
    for name, kwargs, words in [
        ('missing.pth.tar', dict(drop='blocks.3.mlp.fc1.bias'), "missing keys ['blocks.3.mlp.fc1.bias']"),
        ('extra.pth.tar', dict(extra='blocks.0.attn.qkv.bias'), "unexpected keys ['blocks.0.attn.qkv.bias']"),
    ]:
        save_official_lvvit(tmp_path / name, source, **kwargs)
        with pytest.raises(ValueError, match=re.escape(words)):
            timm.create_model('evit_lvvit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / name)))
    torch.save({'state_dict': lvvit_official_layout(source), 'hook': subprocess.Popen}, tmp_path / 'unsafe.pth.tar')
    with pytest.raises(Exception, match='weights_only|Unsupported global'):
        timm.create_model('evit_lvvit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'unsafe.pth.tar')))


def test_timm_contract_pieces():
    model = randomised_lvvit(keep_rate=0.5, dynamic_img_size=True)
    x = torch.randn(2, 3, 160, 256)
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=[4, 15], output_dict=True)
        assert [t.shape for t in inter['image_intermediates']] == [(2, 384, 10, 16)] * 2
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.aux_head.out_features == 10
        compiled = torch.compile(model, fullgraph=True, backend='eager')
        torch.testing.assert_close(compiled(x), model(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16
    model.train().set_grad_checkpointing(True)
    model(x).sum().backward()
    assert {'pos_embed', 'cls_token'} <= model.no_weight_decay()
    assert model.group_matcher()['stem'].startswith('^cls_token')


def test_bench_gmacs_and_tokens_for_lvvit_s():
    rows = run_bench('evit_lvvit_s', keep_rates=(1.0, 0.7), batch_size=1, repeats=1, warmup=0, attn=('math',),
                     latency=False, show_progress=False)
    plain, full, seven = rows
    # by hand: stem convolutions, 16 blocks of n = 197 tokens (qkv, proj, MLP ratio 3: 10 n d^2; attention
    # 2 n^2 d), head and auxiliary head
    d, n = 384, 197
    stem = 112 ** 2 * 64 * 3 * 49 + 2 * 112 ** 2 * 64 * 64 * 9 + 196 * d * 64 * 64
    by_hand = (stem + 16 * (10 * n * d ** 2 + 2 * n ** 2 * d) + d * 1000 + 196 * d * 1000) / 1e9
    assert plain.model == 'evit_lvvit_s' and plain.gmacs == pytest.approx(by_hand, rel=1e-2)   # paper: 6.6
    assert full.gmacs == pytest.approx(by_hand, rel=1e-2)
    assert seven.tokens == [196, 139, 99, 71] and seven.gmacs == pytest.approx(4.7, abs=0.15)  # paper: about 4.7
