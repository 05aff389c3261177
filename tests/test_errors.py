"""Bad input gets a clear error naming the argument and what is allowed; nothing is clamped."""
import numpy as np
import pytest
import timm
import torch

import timm_evit
from helpers import tiny_evit


@pytest.mark.parametrize('keep_rate, error, words', [
    (0.0, ValueError, 'keep_rate must be in (0, 1]'),
    (-0.5, ValueError, 'keep_rate must be in (0, 1]'),
    (1.01, ValueError, 'keep_rate must be in (0, 1]'),
    (float('nan'), ValueError, 'keep_rate must be in (0, 1]'),
    ('0.5', TypeError, 'keep_rate must be a float'),
    (True, TypeError, 'keep_rate must be a float'),
    (None, TypeError, 'keep_rate must be a float'),
    ((0.7, 0.7), ValueError, 'keep_rate has 2 values but there are 3 reorganising blocks'),
    ((0.7, 0.7, 2.0), ValueError, 'keep_rate[2] must be in (0, 1]'),
])
def test_bad_keep_rate(keep_rate, error, words):
    if keep_rate is not None:  # timm.create_model drops None kwargs: None there means the default
        with pytest.raises(error) as info:
            timm.create_model('evit_deit_tiny', keep_rate=keep_rate)
        assert words in str(info.value)
    model = timm.create_model('evit_deit_tiny')
    with pytest.raises(error) as info:
        model.set_keep_rate(keep_rate)
    assert words in str(info.value)
    if keep_rate is not None:  # None in a call means: the model's own keep rate
        with pytest.raises(error):
            model(torch.randn(1, 3, 224, 224), keep_rate=keep_rate)
    assert model.keep_rate == (0.7, 0.7, 0.7)  # unchanged by the failed calls


@pytest.mark.parametrize('reorg_layers, error, words', [
    ((3, 6, 12), ValueError, 'reorg_layers entry 12 is out of range: blocks are 0..11'),
    ((-1,), ValueError, 'reorg_layers entry -1 is out of range'),
    ((6, 3), ValueError, 'strictly increasing'),
    ((3, 3), ValueError, 'strictly increasing'),
    ((3.0,), TypeError, 'integer block indices'),
    ('369', TypeError, 'reorg_layers must be a sequence'),
    (3, TypeError, 'reorg_layers must be a sequence'),
])
def test_bad_reorg_layers(reorg_layers, error, words):
    with pytest.raises(error) as info:
        timm.create_model('evit_deit_tiny', reorg_layers=reorg_layers)
    assert words in str(info.value)


def test_bad_fuse_token_and_token_layout():
    with pytest.raises(TypeError, match='fuse_token must be True or False'):
        timm.create_model('evit_deit_tiny', fuse_token='yes')
    with pytest.raises(ValueError, match=r"score='class' needs a class token, and this model has none"):
        timm.create_model('evit_deit_tiny', class_token=False, global_pool='avg', score='class')
    assert timm.create_model('evit_deit_tiny', class_token=False, global_pool='avg', depth=2).score == 'mean'
    # register tokens are prefix tokens like the class token: kept first, never reorganised
    model = timm.create_model('evit_deit_tiny', reg_tokens=4, keep_rate=0.5, depth=4, reorg_layers=(1,))
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[1], output_fmt='NLC',
                                          intermediates_only=True, return_prefix_tokens=True)
    assert out[0][0].shape[1] == 98 + 1 and out[0][1].shape[1] == 5


@pytest.mark.parametrize('shape, words', [
    ((3, 224, 224), '4 dims'),
    ((1, 1, 224, 224), 'must have 3 channels (in_chans)'),
    ((1, 4, 224, 224), 'must have 3 channels (in_chans)'),
])
def test_bad_input_tensor(shape, words):
    model = tiny_evit()
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(torch.randn(*shape))
        assert words in str(info.value)


def test_a_rate_that_would_keep_no_token_keeps_one():
    model = tiny_evit(keep_rate=1e-6, fuse_token=False).eval()
    tokens = model.forward_intermediates(torch.randn(1, 3, 224, 224), output_fmt='NLC', intermediates_only=True)
    assert [t.shape[1] for t in tokens] == [196, 1, 1, 1]


@pytest.mark.parametrize('number', [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).half()],
                         ids=['np.float32', 'np.float64', '0-d tensor', '0-d half tensor'])
def test_numpy_numbers_and_0d_tensors_are_numbers_everywhere(number):
    # a timm user's numbers come from numpy and tensors too (issue 30): the same as a Python float
    small = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2)
    steps, layer = np.int64(3), torch.tensor(2)
    model = timm.create_model('evit_deit_tiny', keep_rate=number, reorg_layers=(np.int64(1), layer),
                              keep_rate_warmup_start=steps, keep_rate_warmup_steps=torch.tensor(4), **small)
    assert model.keep_rate == (0.5, 0.5) and model.reorg_layers == (1, 2)
    assert type(model.keep_rate_warmup_start) is int and model.keep_rate_warmup_steps == 4
    model.set_keep_rate((number, np.float32(0.25)))
    assert model.keep_rate == (0.5, 0.25)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, keep_rate=number), model(x, keep_rate=0.5), rtol=0, atol=0)
    applied = timm_evit.apply(timm.create_model('deit_tiny_patch16_224', **small), keep_rate=number)
    assert applied.keep_rate == (0.5,) * 3
    with pytest.raises(TypeError, match='keep_rate must be a float'):
        model.set_keep_rate(torch.tensor([0.5, 0.5]))   # not a number: one per block is a list


@pytest.mark.parametrize('name, plain', [('evit_deit_tiny', 'deit_tiny_patch16_224'),
                                         ('evit_vit_base_patch16_siglip_224', 'vit_base_patch16_siglip_224')])
def test_a_model_without_blocks_builds_as_timm_s_does(name, plain):
    # depth=0 builds in timm; it has no block to reorganise (an IndexError before, issue 30)
    small = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=2, depth=0)
    model, reference = timm.create_model(name, **small).eval(), timm.create_model(plain, **small).eval()
    reference.load_state_dict(model.state_dict())
    assert model.reorg_layers == () and model.keep_rate == ()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
