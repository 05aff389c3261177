"""EViT (token reorganisation, ICLR 2022) as timm models: ``timm.create_model('evit_deit_small')``.

Importing ``timm`` registers the models by itself once this package is installed (see
``_timm_evit_autoload``); importing this package does the same explicitly.
"""
from .convert import apply
from .evit_deit import EVIT_DEIT_SMALL_TAGS, VisionTransformerDistilledEViT, VisionTransformerEViT
from .evit_eva import EvaEViT
from .layers import EViTBlock, EViTEvaBlock, attention_with_class_attention, rope_attention_with_class_attention
from .mechanism import EViTMixin
from .evit_lvvit import VisionTransformerEViTLVViT
from . import evit_timm  # noqa: F401  (registers evit_<timm name>)
from .release import HUB_NAMESPACE
from .reorg import (
    class_attention, head_averaged_class_row, num_kept_tokens, reorganize_tokens,
    rotary_rows_for_tokens, tokens_to_patch_grid, trace_patch_token_index, trace_token_patch_ids,
)

__version__ = '0.1.0'

__all__ = [
    'apply', 'VisionTransformerEViT', 'VisionTransformerDistilledEViT', 'VisionTransformerEViTLVViT', 'EViTBlock', 'attention_with_class_attention',
    'EvaEViT', 'EViTEvaBlock', 'EViTMixin', 'rope_attention_with_class_attention',
    'HUB_NAMESPACE', 'EVIT_DEIT_SMALL_TAGS',
    'num_kept_tokens', 'class_attention', 'head_averaged_class_row', 'reorganize_tokens',
    'trace_token_patch_ids', 'trace_patch_token_index', 'tokens_to_patch_grid', 'rotary_rows_for_tokens',
]
