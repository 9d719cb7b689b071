"""RefConvHook in real mmengine Runners: freezing with paramwise_cfg, EMA, recipes, faults."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import refconv_mm  # noqa: F401
from refconv_mm import RefConv2d
from refconv_mm.experiments.shapes_configs import write_config_pair


@pytest.fixture(scope='module')
def base_ckpt(det_data, tmp_path_factory):
    work = str(tmp_path_factory.mktemp('hook_base'))
    paths = write_config_pair(work, det_data['data_root'], 'det', iters=2, size=64, batch=2,
                              log_interval=1)
    cfg = Config.fromfile(paths['baseline'])
    cfg.work_dir = work
    Runner.from_cfg(cfg).train()
    return dict(ckpt=osp.join(work, 'iter_2.pth'), data=det_data)


def refocus_runner(base_ckpt, tmp_path, iters=2, hook=None, extra='', load_from='default'):
    """A Runner for the RefConv config; ``extra`` is appended to that config."""
    paths = write_config_pair(str(tmp_path), base_ckpt['data']['data_root'], 'det', iters=2,
                              refocus_iters=iters, size=64, batch=2, log_interval=1,
                              hook=hook, refconv_extra=extra,
                              load_from=base_ckpt['ckpt'] if load_from == 'default' else load_from)
    cfg = Config.fromfile(paths['refconv'])
    cfg.work_dir = str(tmp_path)
    return Runner.from_cfg(cfg)


def basis_and_refocus(model):
    basis, refocus = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, RefConv2d):
            basis[n] = m.weight.detach().clone()
            refocus[n] = m.refocus_weight.detach().clone()
    return basis, refocus


def assert_basis_kept(model, ckpt_path):
    sd = torch.load(ckpt_path, map_location='cpu')['state_dict']
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, RefConv2d):
            assert torch.equal(m.weight, sd[name + '.weight']), name
            if m.bias is not None:
                assert torch.equal(m.bias, sd[name + '.bias']), name
            n += 1
    assert n > 0


def test_summary_and_basis_frozen_with_paramwise_cfg(base_ckpt, tmp_path, caplog):
    # paramwise_cfg puts backbone params in their own groups with lr/decay multipliers.
    extra = ("optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone': "
             "dict(lr_mult=0.1, decay_mult=2.0)}, norm_decay_mult=0.0))\n")
    runner = refocus_runner(base_ckpt, tmp_path, iters=3, extra=extra)
    runner.train()
    model = runner.model
    assert_basis_kept(model, base_ckpt['ckpt'])
    _, refocus = basis_and_refocus(model)
    assert sum(r.abs().sum() for r in refocus.values()) > 0  # moved away from zero init
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert 'RefConvHook: 36 RefConv layers; frozen basis params' in log
    assert 'trainable refocusing params' in log and 'RANDOM' not in log


def test_basis_frozen_with_ema(base_ckpt, tmp_path):
    extra = "custom_hooks = [dict(type='RefConvHook'), dict(type='EMAHook', momentum=0.5)]\n"
    runner = refocus_runner(base_ckpt, tmp_path, iters=2, extra=extra)
    runner.train()
    assert_basis_kept(runner.model, base_ckpt['ckpt'])
    # The saved (EMA-swapped) checkpoint keeps the basis too.
    saved = torch.load(osp.join(str(tmp_path), 'iter_2.pth'), map_location='cpu')
    base = torch.load(base_ckpt['ckpt'], map_location='cpu')['state_dict']
    assert torch.equal(saved['state_dict']['backbone.conv1.weight'],
                       base['backbone.conv1.weight'])
    assert 'ema_state_dict' in saved


def test_refocus_only_recipe(base_ckpt, tmp_path):
    runner = refocus_runner(base_ckpt, tmp_path, iters=2,
                            hook=dict(type='RefConvHook', recipe='refocus_only'))
    before = {k: v.clone() for k, v in torch.load(base_ckpt['ckpt'], map_location='cpu')
              ['state_dict'].items()}
    runner.train()
    sd = runner.model.state_dict()
    # the plain classifier conv (not RefConv) is frozen by the recipe; BN stays trainable
    assert torch.equal(sd['bbox_head.retina_cls.weight'], before['bbox_head.retina_cls.weight'])
    bn = 'backbone.layer2.0.bn1.weight'
    assert not torch.equal(sd[bn], before[bn])
    assert_basis_kept(runner.model, base_ckpt['ckpt'])


def test_missing_checkpoint_warns_naming_layers(base_ckpt, tmp_path):
    runner = refocus_runner(base_ckpt, tmp_path, iters=1, load_from=None)
    runner.train()
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert 'never loaded from a checkpoint and stay RANDOM and FROZEN' in log
    assert 'backbone.conv1' in log


def test_mismatched_load_from_fails(base_ckpt, seg_data, tmp_path):
    # A segmentation checkpoint for a detector: wrong architecture, bases cannot load.
    seg_work = str(tmp_path / 'seg')
    paths = write_config_pair(seg_work, seg_data['data_root'], 'seg', iters=1, size=64, batch=2)
    cfg = Config.fromfile(paths['baseline'])
    cfg.work_dir = seg_work
    Runner.from_cfg(cfg).train()
    runner = refocus_runner(base_ckpt, tmp_path / 'det', iters=1,
                            load_from=osp.join(seg_work, 'iter_1.pth'))
    with pytest.raises(RuntimeError, match='does not match this model'):
        runner.train()


def test_hook_rejects_model_without_refconv(det_data, tmp_path):
    paths = write_config_pair(str(tmp_path), det_data['data_root'], 'det', iters=1, size=64,
                              batch=2)
    cfg = Config.fromfile(paths['baseline'])
    cfg.work_dir = str(tmp_path)
    cfg.custom_imports = dict(imports=['refconv_mm'])
    cfg.custom_hooks = [dict(type='RefConvHook')]
    with pytest.raises(RuntimeError, match='has no RefConv layer'):
        Runner.from_cfg(cfg).train()


def test_bad_recipe():
    from refconv_mm.hook import RefConvHook
    with pytest.raises(ValueError, match='recipe'):
        RefConvHook(recipe='everything')


@pytest.mark.parametrize('compile_cfg', [True, dict(backend='eager')])
def test_compile_needs_torch_2_1(base_ckpt, tmp_path, compile_cfg):
    """torch 2.0's dynamo cannot tell a traced RefConv that it is traced: the hook refuses the
    config's ``compile`` there, in one sentence, and accepts it from torch 2.1 on."""
    from refconv_mm.compat import COMPILE_MIN_TORCH, torch_version
    from refconv_mm.hook import RefConvHook
    runner = refocus_runner(base_ckpt, tmp_path, iters=1, extra=f'compile = {compile_cfg!r}\n')
    if torch_version() < COMPILE_MIN_TORCH:
        with pytest.raises(RuntimeError, match=r'with RefConv needs torch >= 2\.1'):
            RefConvHook().before_run(runner)
    else:
        RefConvHook().before_run(runner)
