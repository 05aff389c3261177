"""One matrix: family x score x fusion, each cell against the family's reference and on every timm
entry point that carries tokens (docs/design.md, "One token state" and "Testing").

A cell is a converted timm model (random weights, made content-driven so that images rank their
tokens differently) at keep rate 0.5, with one score and one fusion (the paper's, size-aware, or
dropping without fusion). Each cell checks:

- ``forward`` against the family's stepped reference, image by image, and a batch against its
  images alone;
- ``forward_head(forward_features(x))``, and ``forward_head`` of ``forward_intermediates``' final
  features, equal to ``forward`` exactly (the head knows the features' sizes);
- ``model.norm(model.blocks(tokens))`` equal to ``forward_features`` (timm's ``nn.Sequential`` of
  blocks: ViT families; Eva's blocks are a ``ModuleList``, which is not called);
- ``torch.fx.symbolic_trace`` equal to eager (ViT families: timm's Eva forward is not FX-traceable).

Exclusions, by what the model has: ``'class'`` needs a class token, ``'pool'`` an attention pool
(``options.resolve_score`` refuses both otherwise). LV-ViT (its own auxiliary head) has its own
tests in test_lvvit.py. ONNX and ``torch.export`` run per score and fusion in test_export.py.
"""
import pytest
import torch

from helpers import (
    FAMILIES, check_against_family_reference, content_driven, converted, family_params, varied_images,
)

# family -> the scores it can serve (its default first)
SCORES_OF = {
    'deit': ('class', 'mean'),            # class token
    'dinov2_reg': ('class', 'mean'),      # class token and 4 registers, LayerScale
    'eva02': ('class', 'mean'),           # Eva, RoPE
    'reg_gap': ('mean',),                 # no class token, 4 registers, 'avg' head
    'siglip': ('pool', 'mean'),           # no prefix token, 'map' head
    'pe_map': ('pool', 'mean'),           # Eva, AttentionRope, 'map' head, no prefix token
}
FUSIONS = {'paper': dict(fuse_token=True, fusion='paper'), 'size': dict(fuse_token=True, fusion='size'),
           'drop': dict(fuse_token=False, fusion='paper')}
KEEP_RATE = 0.5
# per family, how much sharper attention is made: images then rank their tokens differently
SHARPNESS = {'deit': 1.7, 'dinov2_reg': 1.7, 'eva02': 1.3, 'reg_gap': 3.0, 'siglip': 1.5, 'pe_map': 1.3}
POOL_SHARPNESS = 6.

CELLS = [pytest.param(family, score, fusion, id=f'{family}-{score}-{fusion}', marks=p.marks)
         for family, scores in SCORES_OF.items() for p in family_params([family])
         for score in scores for fusion in FUSIONS]


def cell(family, score, fusion):
    _, model = converted(family, 1.0, FUSIONS[fusion]['fuse_token'], fusion=FUSIONS[fusion]['fusion'])
    content_driven(model, SHARPNESS[family])
    if score == 'pool':   # the pool's own query and keys rank: sharpen them too
        with torch.no_grad():
            model.attn_pool.q.weight.mul_(POOL_SHARPNESS)
            model.attn_pool.kv.weight.mul_(POOL_SHARPNESS)
    model.score = score
    model.set_keep_rate(KEEP_RATE)
    return model


@pytest.mark.parametrize('family,score,fusion', CELLS)
def test_reference_and_every_entry_point(family, score, fusion):
    model = cell(family, score, fusion)
    x = varied_images(FAMILIES[family].size)
    check_against_family_reference(model, family, x)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
        final = model.forward_intermediates(x, indices=1, output_dict=True)['image_features']
        torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=0)
        for b in range(x.shape[0]):   # each image as alone: nothing of one image reaches another
            alone = model(x[b:b + 1])[0]
            assert (alone - logits[b]).abs().max() < 1e-4 * max(1., float(alone.abs().max()))
        if FAMILIES[family].evit_class != 'EvaEViT':
            tokens = model.norm(model.blocks(model._embed(x)))
            torch.testing.assert_close(tokens, features, rtol=1e-5, atol=1e-5)
            traced = torch.fx.symbolic_trace(model)
            torch.testing.assert_close(traced(x), logits, rtol=1e-5, atol=1e-5)
