"""A model saved the way timm saves models (``save_for_hf``; ``push_to_hf_hub`` writes the same
folder) loads back the way timm loads them (``local-dir:``, ``hf-hub:``), equal to the saved one:
the same class and EViT options, the same state dict, the same logits, for every name (the paper's
and ``evit_<timm name>``), with and without a pretrained tag, and every EViT argument, given at
creation or changed afterwards (docs/design.md, "The timm contract")."""
import json

import pytest
import timm
import torch
from timm.models import save_for_hf

import timm_evit
from helpers import EVA_SMALL, SMALL_VIT, images, lay_out_hf_cache, randomise_weights
from timm_evit.options import EVIT_ARGS

# timm records a model's creation arguments (model._model_args, written by save_for_hf) from 1.0.31
# on; an older timm writes only the model_args its caller passes, so nothing of a model round-trips
pytestmark = pytest.mark.skipif(not hasattr(timm.models, 'get_model_args'),
                                reason=f'timm {timm.__version__} does not record model arguments for save_for_hf')

TINY = dict(SMALL_VIT, img_size=96)
TINY_LVVIT = dict(SMALL_VIT, img_size=96, reorg_layers=(1, 2))


def _set(**options):
    """A change made after creation: each EViT setter (``keep_rate`` through ``set_keep_rate``)."""
    def change(model):
        for name, value in options.items():
            setattr(model, name, value)
    return change


def _apply_to_timm(arch, **options):
    """timm's own model, converted afterwards with ``timm_evit.apply``."""
    def build(**kwargs):
        return timm_evit.apply(timm.create_model(arch, **kwargs), **options)
    return build


# (how the model is built: a name or a builder, its creation arguments, a change after creation)
ROUND_TRIPS = {
    'paper-default': ('evit_deit_tiny', TINY, None),
    'paper-tag': ('evit_deit_small.keep60_drop_in1k', TINY, None),
    'paper-tag-fb': ('evit_deit_tiny.fb_in1k', dict(TINY, keep_rate=0.5, fuse_token=False, reorg_layers=(0, 2)), None),
    'paper-per-block': ('evit_deit_tiny', dict(TINY, keep_rate=(0.9, 0.8, 0.6), score='mean', fusion='size'), None),
    'paper-warmup': ('evit_deit_tiny', dict(TINY, keep_rate_warmup_start=2, keep_rate_warmup_steps=5), None),
    'paper-set-after': ('evit_deit_tiny', TINY, _set(keep_rate=(0.9, 0.5, 0.7), fuse_token=False, score='mean',
                                                     fusion='size')),
    'lvvit': ('evit_lvvit_s', dict(TINY_LVVIT, keep_rate=0.6), None),
    'timm-name': ('evit_deit_tiny_patch16_224', TINY, None),
    'timm-name-tag': ('evit_deit_tiny_patch16_224.fb_in1k',
                      dict(TINY, keep_rate=(0.9, 0.5), reorg_layers=(1, 2), fuse_token=False, score='mean',
                           fusion='paper'), None),
    'timm-name-set-after': ('evit_deit_tiny_patch16_224.fb_in1k', TINY, _set(keep_rate=0.5, fusion='paper')),
    'timm-name-siglip': ('evit_vit_base_patch16_siglip_224', TINY, None),           # no class token: 'pool'
    'timm-name-siglip-tag': ('evit_vit_base_patch16_siglip_224.webli', dict(TINY, score='mean', keep_rate=0.5),
                             None),
    'timm-name-eva': ('evit_eva02_small_patch14_224.mim_in22k', dict(EVA_SMALL, keep_rate=0.6), None),
    'apply': (_apply_to_timm('deit_tiny_patch16_224', keep_rate=0.5, fuse_token=False), TINY, None),
    'apply-tag': (_apply_to_timm('vit_base_patch16_siglip_224.webli', keep_rate=(0.8, 0.6, 0.4), score='mean'),
                  TINY, None),
}


def evit_options(model):
    """The model's EViT options, as a model reports them."""
    return {name: getattr(model, name) for name in EVIT_ARGS}


def built(how, kwargs, change):
    model = (timm.create_model(how, **kwargs) if isinstance(how, str) else how(**kwargs))
    if change:
        change(model)
    return randomise_weights(model, seed=3).eval()


def assert_same_model(loaded, saved):
    assert type(loaded) is type(saved)
    assert evit_options(loaded) == evit_options(saved)
    assert loaded.pretrained_cfg['architecture'] == saved.pretrained_cfg['architecture']
    ours, theirs = loaded.state_dict(), saved.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    x = images(timm.models.get_model_input_config(saved)['input_size'][-1])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), saved(x))


@pytest.mark.parametrize('case', list(ROUND_TRIPS))
def test_a_model_saved_for_the_hub_loads_back_equal_through_local_dir(tmp_path, case):
    saved = built(*ROUND_TRIPS[case])
    save_for_hf(saved, tmp_path / 'saved', safe_serialization=True)
    config = json.loads((tmp_path / 'saved' / 'config.json').read_text())
    # the name that builds this model: an evit one, never timm's own architecture
    assert config['architecture'] == saved.pretrained_cfg['architecture']
    assert config['architecture'].startswith('evit_'), config['architecture']
    loaded = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True)
    assert_same_model(loaded, saved)
    # and again: what was loaded saves the same config
    save_for_hf(loaded, tmp_path / 'again', safe_serialization=True)
    assert json.loads((tmp_path / 'again' / 'config.json').read_text()) == config


@pytest.mark.parametrize('case', ['paper-tag', 'timm-name-tag'])
def test_a_folder_published_to_the_hub_loads_back_equal_through_hf_hub(tmp_path, offline_hub, case):
    saved = built(*ROUND_TRIPS[case])
    folder = tmp_path / 'saved'
    save_for_hf(saved, folder, safe_serialization=True)   # what push_to_hf_hub uploads
    lay_out_hf_cache(offline_hub, 'someone/evit-model', {p.name: p.read_bytes() for p in folder.iterdir()})
    assert_same_model(timm.create_model('hf-hub:someone/evit-model', pretrained=True), saved)


@pytest.mark.parametrize('name, arch', [('evit_deit_tiny_patch16_224', 'evit_deit_tiny_patch16_224'),
                                        ('evit_deit_tiny_patch16_224.fb_in1k', 'evit_deit_tiny_patch16_224'),
                                        ('evit_deit_small', 'evit_deit_small')])
def test_pretrained_cfg_names_the_evit_architecture(name, arch):
    model = timm.create_model(name, **TINY)
    assert model.pretrained_cfg['architecture'] == arch and model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg['tag'] == 'fb_in1k'
    # timm's weights for the tag are still where the tag says
    assert model.pretrained_cfg['hf_hub_id'].startswith('timm/deit_')


def test_timms_pruning_reads_the_model_arguments_while_blocks_are_gone():
    # features_only prunes the blocks after out_indices, and timm's reset_classifier records model
    # arguments in between: the reorganising blocks (1, 2, 3) are gone before reorg_layers is cut
    features = timm.create_model('evit_deit_tiny_patch16_224', features_only=True, out_indices=(0, 1), **TINY)
    assert features.model.reorg_layers == (1,) and features.model.keep_rate == (0.7,)
    assert features.model._model_args['reorg_layers'] == (1,)
