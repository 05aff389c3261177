"""What the test modules share (they import this and ``evit_reference``, never each other): small
model arguments, one weight randomisation, the attention-path switch, the timm ViT family table,
the near-tie comparison loop, the command-line runner, the offline Hugging Face cache, and the
official checkpoint layouts (docs/design.md, "Testing")."""
import argparse
import copy
import os
import socket
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as safetensors_bytes

import timm_evit
from evit_reference import checked_choice, kept_indices_by_block, reference_eva, reference_timm_vit

ROOT = Path(__file__).resolve().parents[1]

# ---- small models ------------------------------------------------------------------------------

# 4 blocks of width 48, 2 heads: the architecture of every small ViT here
SMALL_VIT = dict(embed_dim=48, depth=4, num_heads=2)
# an EViT-DeiT at DeiT's 224 px and patch 16 (196 patches), reorganising in blocks 1 and 2
TINY_DEIT = dict(SMALL_VIT, reorg_layers=(1, 2))
TINY_DEIT_CLI = ['embed_dim=48', 'depth=4', 'num_heads=2', 'reorg_layers=(1,2)']
# the same at 32 px in 8 px patches (16 patches): for whole commands
SMALL_VIT_IMG32 = dict(SMALL_VIT, img_size=32, patch_size=8)
TINY_IMG32 = dict(SMALL_VIT_IMG32, reorg_layers=(1, 2))
TINY_IMG32_CLI = ['img_size=32', 'patch_size=8', 'embed_dim=48', 'depth=4', 'num_heads=2', 'reorg_layers=(1,2)']


def tiny_evit(**kwargs):
    """evit_deit_tiny at TINY_DEIT (224 px), with ``kwargs`` over it."""
    return timm.create_model('evit_deit_tiny', **{**TINY_DEIT, **kwargs})


def images(size, batch=2, seed=1):
    """``batch`` seeded random images of ``size`` x ``size``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- weights and attention path ----------------------------------------------------------------

PREFIX_PARAMETERS = ('cls_token', 'reg_token', 'dist_token', 'pos_embed')
PEAKY = ('qkv', 'q_proj', 'k_proj', 'q_bias', 'head')   # query / key projections and the heads


def randomise_weights(model, seed=0, peaky_std=0.1):
    """Every floating tensor of ``model``'s state dict (BatchNorm statistics too) drawn anew, so that
    every part matters and comparisons mean something: scales (norm and BatchNorm weights, running
    variances) near 1, LayerScale near 0.5, prefix tokens and position embeddings large, the
    query / key projections and the heads at ``peaky_std`` (peaky class attention, logits large
    against the tolerances), the rest small. Learnt RoPE frequencies stay as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if not p.is_floating_point() or key.startswith('rope.'):
                continue
            if 'gamma' in key:                                                       # LayerScale
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            elif 'running_var' in key or ('norm' in key or 'bn' in key) and key.endswith('weight'):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif key in PREFIX_PARAMETERS:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                std = peaky_std if any(s in key for s in PEAKY) else 0.05
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def set_attention_path(model, fused):
    """timm's fused attention (SDPA) or its math path (materialised softmax) in every module that has both."""
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused
    return model


def randomised_evit_deit(keep_rate, fuse_token, fused_attn, **kwargs):
    """evit_deit_tiny (DeiT-Ti, 224 px) with randomised weights, in eval, on one attention path."""
    model = timm.create_model('evit_deit_tiny', keep_rate=keep_rate, fuse_token=fuse_token, **kwargs)
    return set_attention_path(randomise_weights(model).eval(), fused_attn)


# ---- timm's ViT families, converted with timm_evit.apply -----------------------------------------

Family = namedtuple('Family', 'name kwargs size prefix_tokens peaky_std reference evit_class block_class')
EVA_SMALL = dict(depth=4, embed_dim=64, num_heads=4, patch_size=8, img_size=48, num_classes=10)


def _vit(name, size, prefix_tokens=1, evit_class='VisionTransformerEViT'):
    return Family(name, dict(SMALL_VIT, img_size=size), size, prefix_tokens, 0.1, reference_timm_vit, evit_class,
                  'EViTBlock')


def _eva(name, prefix_tokens=1, **kwargs):
    return Family(name, dict(EVA_SMALL, **kwargs), 48, prefix_tokens, 0.15, reference_eva, 'EvaEViT', 'EViTEvaBlock')


# Each at a small size, by what it exercises; the Eva ones from timm's own registered configurations.
FAMILIES = {
    'deit': _vit('deit_tiny_patch16_224', 96),
    'deit3': _vit('deit3_small_patch16_224', 96),                                   # LayerScale, no_embed_class
    'augreg': _vit('vit_base_patch16_224.augreg2_in21k_ft_in1k', 96),
    'dinov2_reg': _vit('vit_small_patch14_reg4_dinov2', 84, prefix_tokens=5),       # 4 registers, LayerScale
    'clip_openai': _vit('vit_base_patch16_clip_224.openai', 96),                    # norm_pre, quick GELU
    'clip_laion': _vit('vit_base_patch16_clip_224.laion2b', 96),
    'deit_distilled': _vit('deit_tiny_distilled_patch16_224', 96, prefix_tokens=2,  # class + distillation token
                           evit_class='VisionTransformerDistilledEViT'),
    'eva02': _eva('eva02_small_patch14_224'),                    # RoPE 'cat' (interleaved), qkv + q/v bias, SwiGLU
    'eva02_separate_qkv': _eva('eva02_base_patch14_224'),        # q_proj / k_proj / v_proj, SwiGLU with scale norm
    'dinov3': _eva('vit_small_patch16_dinov3', prefix_tokens=5),  # RoPE 'dinov3' (half), 4 registers, LayerScale
    'pe': _eva('vit_pe_core_tiny_patch16_384', attn_pool_num_heads=4),   # AttentionRope, norm_pre, 'map' pool
    'rope_mixed': _eva('vit_small_patch16_rope_mixed_224'),      # AttentionRope, rows per block and head
    # without a class token, at their default score: 'pool' with a 'map' head, else 'mean' (docs/design.md,
    # "What ranks the tokens")
    'siglip': _vit('vit_base_patch16_siglip_224', 96, prefix_tokens=0),          # 'map' head, no prefix token
    'reg_gap': _vit('vit_medium_patch16_reg4_gap_256', 96, prefix_tokens=4),     # 4 registers, 'avg' head
    'eva02_gap': _eva('eva02_small_patch14_224', prefix_tokens=0, class_token=False, global_pool='avg'),
    'dinov3_gap': _eva('vit_small_patch16_dinov3', prefix_tokens=4, class_token=False, global_pool='avg'),
    'pe_map': _eva('vit_pe_core_tiny_patch16_384', prefix_tokens=0, class_token=False, global_pool='map',
                   attn_pool_num_heads=4),                       # AttentionRope, 'map' head, no prefix token
}
VIT_FAMILIES = [f for f, family in FAMILIES.items() if family.reference is reference_timm_vit]
EVA_FAMILIES = [f for f, family in FAMILIES.items() if family.reference is reference_eva]


def _missing(family):
    """Why this timm cannot build the family (feature detection), or None."""
    name = FAMILIES[family].name
    return None if timm.is_model(name) else f'timm {timm.__version__} has no {name}'


def family_params(families=tuple(FAMILIES)):
    """pytest parameters of ``families``, each skipped where the installed timm lacks it."""
    return [pytest.param(f, id=f, marks=pytest.mark.skipif(bool(_missing(f)), reason=_missing(f) or ''))
            for f in families]


def randomised_original(family, seed=0, **overrides):
    """The family's timm model, small, with randomised weights, in eval."""
    spec = FAMILIES[family]
    model = timm.create_model(spec.name, **{**spec.kwargs, **overrides}).eval()
    return randomise_weights(model, seed, peaky_std=spec.peaky_std)


def converted(family, keep_rate, fuse_token, fused_attn=True, fusion='paper', **overrides):
    """The randomised original (on one attention path) and a converted deep copy of it."""
    original = set_attention_path(randomised_original(family, **overrides), fused_attn)
    model = timm_evit.apply(copy.deepcopy(original), keep_rate=keep_rate, fuse_token=fuse_token, fusion=fusion)
    return original, model


# ---- per-image budgets: weights and images whose counts differ by image ----------------------------

# how much sharper the query / key projections are made, per family, for counts that differ by image
SHARPER = {'deit': 1.7, 'dinov2_reg': 1.7, 'eva02': 1.3, 'reg_gap': 3.0}


def content_driven(model, sharper):
    """The randomised model with patch content louder than position and sharper attention, so that
    images of different content get different counts (as trained models do; random weights alone
    attend almost evenly)."""
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(8)
        if getattr(model, 'pos_embed', None) is not None:
            model.pos_embed.mul_(0.1)
        for name, p in model.named_parameters():
            if name.endswith(('qkv.weight', 'q_proj.weight', 'k_proj.weight')):
                p.mul_(sharper)
    return model


def varied_images(size):
    """Four images: a blank field, a small object on a blank field, clutter everywhere, clutter on half."""
    x = images(size, batch=4, seed=3)
    x[0] = 0.
    x[1] = 0.
    x[1, :, 8:24, 8:24] = images(16, batch=1, seed=5)[0] * 6
    x[2] *= 2.
    x[3] = 0.
    x[3, :, :, :size // 2] = images(size, batch=1, seed=7)[0, :, :, :size // 2] * 4
    return x


# ---- near-ties: the model's choice, checked, then everything else by the reference ----------------

def compare_with_reference(model, x, reference, logits=None, min_logit_std=0.1):
    """Image by image: ``reference(b, choose)`` gives image ``b``'s reference logits, selecting with
    ``choose``, which adopts the model's kept tokens only after checking them against the
    reference's own attention up to near-ties (``checked_choice``); the model's logits (or
    ``logits``) must equal them within 5e-5 of their magnitude. The logits must be large against
    that tolerance (std above ``min_logit_std``, None: not checked). Returns the model's logits."""
    model_logits, kept = kept_indices_by_block(model, x)
    logits = (model_logits if logits is None else logits).detach().cpu()
    for b in range(x.shape[0]):
        choose = checked_choice({block: idx[b].tolist() for block, idx in kept.items()})
        with torch.no_grad():
            ref = reference(b, choose)
        assert (logits[b] - ref).abs().max() < 5e-5 * max(1., float(ref.abs().max()))
    if min_logit_std is not None:
        assert logits.std() > min_logit_std   # the tolerances are small against the logits themselves
    return logits


def assert_tokens_match(ours, theirs):
    """One image's tokens after one block, in order, against the reference's."""
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4 * max(1., float(theirs.abs().max()))


def check_against_family_reference(model, family, x, embedded=None):
    """The model's logits and its tokens after every block (prefix tokens first) against the
    family's stepped reference, image by image. ``embedded(b)``: image b's tokens and rotary rows
    as the model's own embedding drew them (Eva in training, patch dropout); the tokens are then
    not compared (forward_intermediates would draw anew)."""
    P = model.num_prefix_tokens
    rates = dict(zip(model.reorg_layers, model.keep_rate))
    if embedded is None:
        with torch.no_grad():
            out = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, return_prefix_tokens=True)

    def reference(b, choose):
        extra = {} if embedded is None else dict(embedded=embedded(b))
        ref, ref_tokens = FAMILIES[family].reference(model, x[b], rates, model.fuse_token, choose=choose,
                                                     score=model.score, fusion=model.fusion,
                                                     **extra)
        if embedded is None:
            for (tokens, prefix), theirs in zip(out, ref_tokens):
                assert prefix.shape[1] == P                                # prefix tokens unchanged in count
                assert_tokens_match(torch.cat([prefix[b], tokens[b]]), theirs)
        return ref
    compare_with_reference(model, x, reference)


def write_class_images(root, images_per_class, shape_of, signal_step):
    """``root/validation/{cat,dog,fox}/i.png``: random pixels of ``shape_of(i)`` (H, W, 3), the class's
    own channel set to ``255 - signal_step * i`` (some class signal). Returns ``root``."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(['cat', 'dog', 'fox']):
        (root / 'validation' / name).mkdir(parents=True)
        for i in range(images_per_class):
            pixels = rng.integers(0, 255, shape_of(i), dtype=np.uint8)
            pixels[..., c] = 255 - signal_step * i
            Image.fromarray(pixels).save(root / 'validation' / name / f'{i}.png')
    return root


# ---- the command line, in this interpreter -------------------------------------------------------

CliResult = namedtuple('CliResult', 'code out err')


def run_cli(capsys, argv):
    """``timm-evit ARGV`` in this interpreter: its exit code (argparse's own errors included), stdout, stderr."""
    from timm_evit.tools.cli import main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:   # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def count_calls(monkeypatch, calls: dict, **targets) -> None:
    """Replace each ``name=(module, attribute)`` of ``targets`` by a wrapper that counts its calls in
    ``calls[name]`` and then calls it."""
    for name, (module, attribute) in targets.items():
        real = getattr(module, attribute)
        calls[name] = 0

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, attribute, counted)


def assert_one_line_error(code, err, command, *words):
    """A user's mistake: exit code 2 and one plain line on stderr naming the command and ``words``."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    assert lines[0].startswith(f'timm-evit {command}: ') and '\x1b[' not in lines[0], lines[0]
    assert all(w in lines[0] for w in words), (words, lines[0])


# ---- the Hugging Face Hub, offline ----------------------------------------------------------------

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def lay_out_hf_cache(cache, repo_id, files):
    """The Hugging Face cache layout that hf_hub_download resolves offline (refs/main -> a
    snapshot), holding ``files`` (file name -> bytes) as the repository ``repo_id``."""
    repo = Path(cache) / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(COMMIT)
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def safetensors_file(state_dict):
    """A model.safetensors file's bytes, as timm's Hub repositories hold it."""
    return safetensors_bytes({k: v.contiguous() for k, v in state_dict.items()})


def _no_network(*args, **kwargs):
    raise OSError('the tests never use the network')


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline (as under HF_HUB_OFFLINE=1, which it reads when imported), its cache
    a new folder (returned: empty until the test lays out a repository), and no socket that
    connects: nothing is ever downloaded, in this interpreter."""
    from huggingface_hub import constants
    cache = tmp_path / 'offline_hub' / 'hub'
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(socket.socket, 'connect', _no_network)
    monkeypatch.setattr(socket, 'create_connection', _no_network)
    return cache


# ---- official checkpoint layouts, weights/hub.py, folders -----------------------------------------------

def load_hub():
    """weights/hub.py (not a package module)."""
    if str(ROOT / 'weights') not in sys.path:
        sys.path.insert(0, str(ROOT / 'weights'))
    import hub
    return hub


DEIT_ROW = 'evit_deit_small.keep60_drop_in1k'
LVVIT_ROW = 'evit_lvvit_s.tl_in1k'


def official_evit_checkpoint(path, seed=0, drop=None, extra=None):
    """What the official EViT main.py saves: {'model': DeiT-S state dict, ..., 'args': Namespace}."""
    torch.manual_seed(seed)
    sd = timm.create_model('deit_small_patch16_224').state_dict()
    with torch.no_grad():
        for v in sd.values():
            v.add_(0.05 * torch.randn_like(v))
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(3)
    torch.save({'model': sd, 'optimizer': {'state': {}}, 'epoch': 29,
                'args': argparse.Namespace(base_keep_rate=0.6, fuse_token=False)}, path)
    return sd


def randomised_lvvit(name='evit_lvvit_s', seed=0, **kwargs):
    """An EViT-LV-ViT with randomised weights (its BatchNorm statistics too), in eval."""
    return randomise_weights(timm.create_model(name, **kwargs), seed).eval()


def lvvit_official_layout(model):
    """An EViT-LV-ViT's state dict under the official Token Labeling key names (LV_ViT, PatchEmbed4_2)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith('patch_embed.proj.proj.'):
            k = 'patch_embed.proj.' + k[len('patch_embed.proj.proj.'):]
        elif k.startswith('patch_embed.proj.'):
            k = 'patch_embed.' + k[len('patch_embed.proj.'):]
        sd[k] = v.clone()
    return sd


def save_official_lvvit(path, model, nesting='state_dict', prefix='module.', drop=None, extra=None):
    """What Token Labeling's training script saves, with ``model``'s weights."""
    sd = {prefix + k: v for k, v in lvvit_official_layout(model).items()}
    if drop:
        sd.pop(prefix + drop)
    if extra:
        sd[prefix + extra] = torch.zeros(1)
    checkpoint = {nesting: sd, 'epoch': 299, 'arch': 'lvvit_s', 'args': argparse.Namespace(lr=1.6e-3, model='lvvit_s')}
    torch.save(checkpoint, path)


def takes_files(folder):
    """Whether ``folder`` takes a new file (as root, or with CAP_DAC_OVERRIDE, a read-only folder does)."""
    try:
        (folder / 'probe').write_text('')
    except PermissionError:
        return False
    (folder / 'probe').unlink()
    return True


def without_hf_environment(**env):
    """os.environ without any Hugging Face variable, with ``env`` over it: for a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    clean.update(env)
    return clean
