import pytest
import timm
import torch

import timm_evit  # noqa: F401  (registers the models even where the autoload hook is off)

# A small EViT-DeiT for contract tests: 4 blocks, reorganising in blocks 1 and 2.
TINY = dict(embed_dim=48, depth=4, num_heads=2, reorg_layers=(1, 2))


def tiny_evit(**kwargs):
    return timm.create_model('evit_deit_tiny', **{**TINY, **kwargs})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
