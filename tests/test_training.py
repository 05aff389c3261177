"""Training the way timm's train.py does: keep-rate warm-up, timm's own pieces end to end, resume,
distillation, and DDP across 2 processes."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from helpers import TINY_IMG32
from timm_evit.schedule import warmup_keep_rate

TINY_IMG32_3_CLASSES = dict(TINY_IMG32, num_classes=3)


@pytest.mark.parametrize('step, expected', [
    (0, 1.0), (9, 1.0), (10, 1.0), (35, 0.7 + 0.3 * (1 + math.cos(math.pi / 4)) / 2), (60, 0.85),
    (85, 0.7 + 0.3 * (1 + math.cos(3 * math.pi / 4)) / 2), (110, 0.7), (10_000, 0.7),
])
def test_warmup_follows_the_papers_cosine(step, expected):
    # keep 1 for `start` steps, then cos from 1 to the target over `steps` steps (EViT, Sec. 4)
    assert warmup_keep_rate(step, 0.7, start=10, steps=100) == pytest.approx(expected, abs=1e-12)


def test_model_counts_training_steps_and_uses_the_schedule():
    model = timm.create_model('evit_deit_tiny', keep_rate=0.5, keep_rate_warmup_start=2, keep_rate_warmup_steps=4,
                              **TINY_IMG32_3_CLASSES).train()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    for _ in range(8):
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        seen.append(tokens[1].shape[1])
    # 16 tokens; rates 1, 1, 1, 0.927, 0.75, 0.573, 0.5, 0.5 -> kept ceil(16 r), plus the fused token
    assert seen == [16, 16, 16, 16, 13, 11, 9, 9]
    assert int(model.keep_rate_step) == 8
    model.eval()
    with torch.no_grad():
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    assert tokens[1].shape[1] == 9 and int(model.keep_rate_step) == 8   # eval: target rate, no counting


def test_the_schedule_follows_every_write_of_its_step_buffer():
    # Training forwards remember the step they wrote (on a GPU a read of the buffer would wait for
    # it); a write by anything else, a user or a load, must still be seen.
    kwargs = dict(keep_rate=0.5, keep_rate_warmup_start=1, keep_rate_warmup_steps=6, **TINY_IMG32_3_CLASSES)
    model = timm.create_model('evit_deit_tiny', **kwargs).train()
    x = torch.randn(1, 3, 32, 32)

    def rates(step):
        return tuple(warmup_keep_rate(step, 0.5, start=1, steps=6) for _ in model.reorg_layers)
    for _ in range(3):
        model(x)
    assert model.scheduled_keep_rate() == rates(3)
    with torch.no_grad():
        model.keep_rate_step.fill_(6)
    assert model.scheduled_keep_rate() == rates(6) != rates(3)
    other = timm.create_model('evit_deit_tiny', **kwargs).train()
    other(x)
    model.load_state_dict(other.state_dict())
    assert model.scheduled_keep_rate() == rates(1)
    model(x)
    assert int(model.keep_rate_step) == 2 and model.scheduled_keep_rate() == rates(2)


def test_resume_continues_the_schedule_exactly():
    kwargs = dict(keep_rate=0.5, keep_rate_warmup_start=1, keep_rate_warmup_steps=6, **TINY_IMG32_3_CLASSES)
    a = timm.create_model('evit_deit_tiny', **kwargs).train()
    x = torch.randn(1, 3, 32, 32)
    for _ in range(3):
        a(x)
    b = timm.create_model('evit_deit_tiny', **kwargs).train()
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert a.scheduled_keep_rate() == b.scheduled_keep_rate()
        a(x), b(x)
    # weights saved without warm-up progress (timm's DeiT) start at step 0; progress is dropped
    # when loading into a model without warm-up
    plain = timm.create_model('evit_deit_tiny', **TINY_IMG32_3_CLASSES)
    plain.load_state_dict(a.state_dict())
    fresh = timm.create_model('evit_deit_tiny', **kwargs)
    fresh.load_state_dict(plain.state_dict())
    assert int(fresh.keep_rate_step) == 0


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('validation', 4)):
        for c in range(3):
            (root / split / f'class{c}').mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                pixels[:, :, c] += 150  # a learnable colour cue
                Image.fromarray(pixels).save(root / split / f'class{c}' / f'{i}.png')
    return root


def _train_pieces(root, resume=None):
    """The objects train.py builds, from timm's own factories."""
    from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model('evit_deit_tiny', drop_path_rate=0.1, keep_rate=0.5, keep_rate_warmup_steps=4,
                              **TINY_IMG32_3_CLASSES)
    data_config = resolve_data_config({'input_size': (3, 32, 32)}, model=model)  # as train.py --input-size
    dataset = create_dataset('', root=str(root), split='train', is_training=True)
    loader = create_loader(dataset, input_size=data_config['input_size'], batch_size=6, is_training=True,
                           use_prefetcher=False, device=torch.device('cpu'), num_workers=0, persistent_workers=False,
                           mean=data_config['mean'], std=data_config['std'], interpolation=data_config['interpolation'])
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=4, warmup_epochs=1, updates_per_epoch=2)
    ema = ModelEmaV3(model, decay=0.9)
    if resume:
        from timm.models import resume_checkpoint
        resume_checkpoint(model, resume, optimizer=optimizer)
        ema.module.load_state_dict(torch.load(resume, weights_only=True)['state_dict_ema'])
    return model, loader, mixup, SoftTargetCrossEntropy(), optimizer, scheduler, ema, data_config


def _step(model, batch, mixup, loss_fn, optimizer, ema, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    images, targets = mixup(batch[0].clone(), batch[1].clone())  # Mixup mixes in place
    model.train()
    loss = loss_fn(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(model)
    return loss.item()


def test_end_to_end_with_timms_pieces_and_resume(image_folder, tmp_path):
    from timm.data import create_dataset, create_loader

    model, loader, mixup, loss_fn, optimizer, scheduler, ema, data_config = _train_pieces(image_folder)
    torch.manual_seed(1)
    batches = [next(iter(loader)) for _ in range(4)]   # fixed batches so the two runs see the same data
    losses = []
    for i, batch in enumerate(batches[:3]):
        losses.append(_step(model, batch, mixup, loss_fn, optimizer, ema, seed=i))
        scheduler.step_update(num_updates=i + 1)
    assert all(math.isfinite(v) for v in losses)
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 0, 'arch': 'evit_deit_tiny', 'state_dict': model.state_dict(),
                'optimizer': optimizer.state_dict(), 'state_dict_ema': ema.module.state_dict()}, checkpoint)
    uninterrupted = _step(model, batches[3], mixup, loss_fn, optimizer, ema, seed=3)

    resumed_model, _, mixup2, loss_fn2, optimizer2, _, ema2, _ = _train_pieces(image_folder, resume=str(checkpoint))
    assert int(resumed_model.keep_rate_step) == 3
    resumed = _step(resumed_model, batches[3], mixup2, loss_fn2, optimizer2, ema2, seed=3)
    assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)

    # the EMA model evaluates, as train.py's validate() does
    val = create_loader(create_dataset('', root=str(image_folder), split='validation'), input_size=data_config['input_size'],
                        batch_size=4, is_training=False, use_prefetcher=False, device=torch.device('cpu'),
                        num_workers=0, persistent_workers=False, mean=data_config['mean'], std=data_config['std'])
    ema.module.eval()
    with torch.no_grad():
        for x, y in val:   # the EMA copy is an EViT model at its keep rate: 16 patches -> 8 + 1 -> 5 + 1
            assert ema.module.forward_features(x).shape[1] == 1 + 5 + 1 and ema.module(x).shape == (x.shape[0], 3)


def test_distillation_task_with_an_evit_student(image_folder):
    from timm.task import LogitDistillationTask
    student = timm.create_model('evit_deit_tiny', keep_rate=0.5, **TINY_IMG32_3_CLASSES)
    plain_kwargs = {k: v for k, v in TINY_IMG32_3_CLASSES.items() if k != 'reorg_layers'}
    teacher = timm.create_model('deit_tiny_patch16_224', **plain_kwargs).eval()
    task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.5,
                                 temperature=2.0, device=torch.device('cpu'), verbose=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    with torch.no_grad():   # the loss of logit distillation (Hinton et al.), from the EViT student's own logits
        s, t = student(x) / 2.0, teacher(x) / 2.0
        kd = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * 2.0 ** 2
        expected = 0.5 * torch.nn.functional.cross_entropy(student(x), y) + 0.5 * kd
    torch.testing.assert_close(out['loss'].detach(), expected, rtol=1e-5, atol=1e-6)
    out['loss'].backward()
    assert student.blocks[3].mlp.fc2.weight.grad is not None


DDP_SCRIPT = '''
import os, sys, torch, timm, torch.distributed as dist
import timm_evit  # noqa
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group('gloo')
rank = dist.get_rank()
fuse = sys.argv[1] == 'fuse'
torch.manual_seed(0)
model = timm.create_model('evit_deit_tiny', keep_rate=0.5, fuse_token=fuse, img_size=32, patch_size=8, embed_dim=48,
                          depth=4, num_heads=2, reorg_layers=(1, 2), num_classes=3, keep_rate_warmup_steps=2)
ddp = DDP(model)  # find_unused_parameters=False: any unused parameter would be an error
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
torch.manual_seed(100 + rank)  # different data on each rank
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(ddp(torch.randn(4, 3, 32, 32)), torch.randint(0, 3, (4,)))
    opt.zero_grad(); loss.backward(); opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), 'parameters differ between ranks'
if rank == 0:
    torch.save({'state_dict': model.state_dict()}, sys.argv[2])
dist.barrier()
dist.destroy_process_group()
open(os.path.join(os.path.dirname(sys.argv[2]), f'rank{rank}.ok'), 'w').close()
# Every check has passed. Leave without the interpreter's teardown, where torch's distributed
# threads can abort ("terminate called without an active exception": once in about 20 runs here,
# exact place not located); a failure before this line still fails the test.
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


def free_port() -> int:
    # a port nobody listens on now, so that concurrent test runs never meet on one
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('fuse', ['fuse', 'drop'])
def test_ddp_two_processes_stay_in_sync(tmp_path, fuse):
    script = tmp_path / 'ddp_train.py'
    script.write_text(DDP_SCRIPT)
    checkpoint = tmp_path / 'rank0.pth.tar'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(free_port()), str(script), fuse, str(checkpoint)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'rank0.ok').exists() and (tmp_path / 'rank1.ok').exists()   # both ranks finished
    model = timm.create_model('evit_deit_tiny', fuse_token=fuse == 'fuse', img_size=32, patch_size=8, embed_dim=48,
                              depth=4, num_heads=2, reorg_layers=(1, 2), num_classes=3, keep_rate_warmup_steps=2)
    timm.models.load_checkpoint(model, str(checkpoint))
    assert int(model.keep_rate_step) == 3
