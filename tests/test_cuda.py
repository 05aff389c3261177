"""EViT on a CUDA GPU: the same function as on the CPU, and no host-device synchronisation in
forward. Skipped where torch sees no GPU (CI has none); run them on a GPU machine with
`pytest tests/test_cuda.py`."""
import copy

import pytest
import timm
import torch

import timm_evit
from evit_reference import reference_forward
from helpers import FAMILIES, SMALL_VIT, compare_with_reference, converted, images, randomised_evit_deit

DEVICE = 'cuda'   # (the tests' bodies smoke-run on the CPU by setting this, where no GPU is lent)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def _full_fp32():
    # fp32 on the GPU must be fp32: no TF32 in cuDNN's convolution (the patch embedding) or matmuls
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('keep_rate', [0.7, 0.5])
def test_cuda_logits_match_the_cpu_reference(keep_rate, fuse_token):
    model = randomised_evit_deit(keep_rate, fuse_token, fused_attn=True).cuda()
    images = torch.randn(3, 3, 224, 224)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    rates = dict(zip(model.reorg_layers, model.keep_rate))

    def reference(b, choose):
        return reference_forward(sd, images[b], model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0],
                                 rates, fuse_token, choose=choose)[0]
    compare_with_reference(model, images.cuda(), reference)


def _applied_dinov2():
    plain = timm.create_model('vit_small_patch14_reg4_dinov2', img_size=98)
    return timm_evit.apply(plain, keep_rate=0.7)


MODELS = {
    'evit_deit_small': lambda: timm.create_model('evit_deit_small', keep_rate=0.7),
    'evit_deit_small_drop': lambda: timm.create_model('evit_deit_small', keep_rate=0.7, fuse_token=False),
    'applied_deit_distilled': lambda: timm_evit.apply(timm.create_model('deit_small_distilled_patch16_224'), 0.7),
    'evit_lvvit_s': lambda: timm.create_model('evit_lvvit_s', keep_rate=0.7),
    'applied_dinov2_reg4': _applied_dinov2,
    # size-aware fusion (the default of every evit_<timm name>): the key bias in SDPA's mask, the
    # weighted mean, the sizes; with each score: 'class', 'pool' (SigLIP's attention pool), 'mean'
    'evit_deit_small_patch16_224': lambda: timm.create_model('evit_deit_small_patch16_224', keep_rate=0.7),
    'evit_siglip_pool': lambda: timm.create_model('evit_vit_base_patch16_siglip_224', keep_rate=0.7,
                                                  img_size=64, **SMALL_VIT),
    'evit_reg4_gap_mean': lambda: timm.create_model('evit_vit_medium_patch16_reg4_gap_256', keep_rate=0.7,
                                                    img_size=64, **SMALL_VIT),
}


def _no_sync(fn):
    torch.cuda.set_sync_debug_mode('error')  # any synchronising call raises
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('name', list(MODELS))
def test_inference_makes_no_host_device_synchronisation(name, dtype):
    model = MODELS[name]().to('cuda', dtype).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size, device='cuda', dtype=dtype)
    with torch.inference_mode():
        model(x)  # first call: lazy initialisation (handles, kernels) may synchronise once
        torch.cuda.synchronize()
        _no_sync(lambda: (model(x), model(x, keep_rate=0.5), model.forward_intermediates(x)))


def test_training_with_warmup_makes_no_host_device_synchronisation():
    model = timm.create_model('evit_deit_small', keep_rate=0.5, keep_rate_warmup_start=1,
                              keep_rate_warmup_steps=3).cuda().train()
    x = torch.randn(4, 3, 224, 224, device='cuda')
    model(x).sum().backward()  # step 1, which reads the step buffer once
    torch.cuda.synchronize()
    sizes = []
    for _ in range(4):
        def step():
            tokens = model.forward_intermediates(x, output_fmt='NLC')
            tokens[0].sum().backward()
            return tokens[1][-1].shape[1]
        sizes.append(_no_sync(step))
    assert int(model.keep_rate_step) == 5
    # patch tokens after the last reorganisation at 0.5: 196 -> 98 + 1 fused -> 50 + 1 -> 26 + 1
    assert sizes[-1] == 27 and sizes[0] > sizes[-1]


def test_bf16_autocast_training_step_reaches_every_parameter():
    model = timm.create_model('evit_deit_small', keep_rate=0.7, num_classes=10).cuda().train()
    x, y = torch.randn(8, 3, 224, 224, device='cuda'), torch.randint(10, (8,), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_close_to_fp32():
    model = randomised_evit_deit(0.7, True, fused_attn=True).cuda()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    # bf16 rounding must stay well below what tells two images apart (a wrong image's logits fail)
    assert (out.float() - ref).abs().max() < 0.25 * (ref[0] - ref[1]).abs().max()


def test_inductor_compiled_equals_eager():
    model = randomised_evit_deit(0.5, True, fused_attn=True).cuda()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    assert (out - ref).abs().max() < 1e-4 * max(1., float(ref.abs().max()))


@pytest.mark.parametrize('family,score', [('deit', 'class'), ('siglip', 'pool'), ('reg_gap', 'mean'),
                                          ('dinov2_reg', 'mean')])
def test_size_aware_fusion_and_every_score_match_the_cpu_reference(family, score):
    # the GPU model's logits against the family's reference run on the CPU copy of the same weights,
    # near-ties resolved by the GPU model's own choice (compare_with_reference)
    _, cpu_model = converted(family, 0.5, True, fusion='size')
    cpu_model.score = score
    model = copy.deepcopy(cpu_model).to(DEVICE)
    x = images(FAMILIES[family].size, batch=3)
    rates = dict(zip(model.reorg_layers, model.keep_rate))

    def reference(b, choose):
        with torch.no_grad():
            return FAMILIES[family].reference(cpu_model, x[b], rates, True, choose=choose, score=score,
                                              fusion='size')[0]
    compare_with_reference(model, x.to(DEVICE), reference)
