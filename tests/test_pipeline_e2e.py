"""The whole workflow through the tools, as a user runs it: baseline -> refocus -> merge -> test.

Real Runners in subprocesses, real checkpoints on disk, real torchrun processes.
"""
import os
import os.path as osp
import shutil

import pytest
import torch

from refconv_mm.merge import refconv_prefixes
from refconv_mm.experiments.runlogs import logged_metrics
from refconv_mm.experiments.shapes_configs import write_config_pair

from .conftest import MIM, ROOT, run_tool

TESTS = osp.dirname(osp.abspath(__file__))


# The whole-model route: RefConvModel wraps the baseline's model (retina_cls/reg included).
REFCONV_MODEL = "dict(_delete_=True, type='RefConvModel', model=_base_.model)"


def frozen_by_model(task):
    """Prefixes the model itself freezes: mmdet's ResNet has frozen_stages=1."""
    return ('backbone.conv1.', 'backbone.layer1.') if task.startswith('det') else ()


def write_configs(task, work, data, **kwargs):
    """The config pair of ``task``: 'det'/'seg' (conv_cfg route) or 'det-model' (RefConvModel)."""
    if task == 'det-model':
        return write_config_pair(work, data['data_root'], 'det', override=REFCONV_MODEL, **kwargs)
    return write_config_pair(work, data['data_root'], task, **kwargs)


def load_sd(path):
    return torch.load(path, map_location='cpu')['state_dict']


@pytest.fixture(scope='module', params=['det', 'det-model', 'seg'])
def workflow(request, det_data, seg_data, tmp_path_factory):
    task = request.param
    data = seg_data if task == 'seg' else det_data
    work = str(tmp_path_factory.mktemp(f'e2e_{task}'))
    paths = write_configs(task, work, data, iters=4, refocus_iters=4, size=64, batch=2,
                          log_interval=1, ckpt_interval=2)
    run_tool('tools/train.py', paths['baseline'], '--work-dir', osp.join(work, 'base'))
    base_ckpt = osp.join(work, 'base', 'iter_4.pth')
    run_tool('tools/train.py', paths['refconv'], '--work-dir', osp.join(work, 'ref'),
             '--cfg-options', f'load_from={base_ckpt}')
    return dict(task=task, work=work, paths=paths, base=base_ckpt,
                ref=osp.join(work, 'ref', 'iter_4.pth'))


def test_basis_bit_identical_and_refocus_moved(workflow):
    base, ref = load_sd(workflow['base']), load_sd(workflow['ref'])
    prefixes = refconv_prefixes(ref)
    assert len(prefixes) > 10
    if workflow['task'] == 'det-model':  # convs that never see conv_cfg are refocused too
        assert {'bbox_head.retina_cls.', 'bbox_head.retina_reg.'} <= set(prefixes)
    for p in prefixes:
        assert torch.equal(ref[p + 'weight'], base[p + 'weight']), p
        if p + 'bias' in base:
            assert torch.equal(ref[p + 'bias'], base[p + 'bias']), p
    # mmdet's ResNet freezes stage 1 (frozen_stages=1), refocusing weights included.
    frozen = frozen_by_model(workflow['task'])
    for p in prefixes:
        moved = bool(ref[p + 'refocus_weight'].abs().sum() > 0)
        assert moved != p.startswith(frozen), p


def test_merge_then_original_config_reproduces_metrics(workflow):
    w = workflow
    merged = osp.join(w['work'], 'merged.pth')
    plain_cfg = osp.join(w['work'], 'plain_config.py')
    out = run_tool('tools/merge_refconv.py', w['paths']['refconv'], w['ref'], merged,
                   '--verify', '--out-config', plain_cfg)
    assert 'verify: max |refocused - merged|' in out.stdout
    ckpt = torch.load(merged, map_location='cpu')
    assert set(ckpt) == {'meta', 'state_dict'} and ckpt['meta']['refconv_mm']['merged_layers']
    assert not refconv_prefixes(ckpt['state_dict'])
    # the ORIGINAL config, strict load, the real test loop
    run_tool('tools/test.py', w['paths']['baseline'], merged, '--work-dir',
             osp.join(w['work'], 'test_merged'))
    run_tool('tools/test.py', w['paths']['refconv'], w['ref'], '--work-dir',
             osp.join(w['work'], 'test_ref'))
    m_merged = logged_metrics(osp.join(w['work'], 'test_merged'))
    m_ref = logged_metrics(osp.join(w['work'], 'test_ref'))
    key = 'mIoU' if w['task'] == 'seg' else 'coco/bbox_mAP'
    assert key in m_merged and key in m_ref
    for k, v in m_ref.items():
        if isinstance(v, float) and ('mAP' in k or 'IoU' in k or 'Acc' in k):
            assert abs(v - m_merged[k]) <= 1e-4, (k, v, m_merged[k])
    # the written plain config builds the plain model and loads the merged weights strictly
    from mmengine.config import Config

    from refconv_mm.verify import build_model
    model = build_model(Config.fromfile(plain_cfg))
    model.load_state_dict(ckpt['state_dict'], strict=True)


def test_resume_keeps_refocus_state(workflow, tmp_path):
    """Stop after 2 refocus iterations, resume from iter_2.pth, finish at 4."""
    w = workflow
    work = str(tmp_path / 'resume')
    os.makedirs(work)
    shutil.copy(osp.join(w['work'], 'ref', 'iter_2.pth'), work)
    with open(osp.join(work, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(work, 'iter_2.pth'))
    cfg = osp.join(w['work'], 'refconv_probe.py')
    with open(cfg, 'w') as f:
        f.write("_base_ = './refconv.py'\n"
                "custom_imports = dict(imports=['refconv_mm', 'probe_hooks'])\n"
                "custom_hooks = [dict(type='RefConvHook'), dict(type='RankDumpHook')]\n")
    run_tool('tools/train.py', cfg, '--work-dir', work, '--resume', env=dict(PYTHONPATH=TESTS))
    start = torch.load(osp.join(work, 'before_train_rank0.pth'), map_location='cpu')
    stop = load_sd(osp.join(work, 'iter_2.pth'))
    assert start['iter'] == 2 and start['optimizer_state']
    for p in refconv_prefixes(stop):
        assert torch.equal(start['state_dict'][p + 'refocus_weight'], stop[p + 'refocus_weight'])
    end = load_sd(osp.join(work, 'iter_4.pth'))
    base = load_sd(w['base'])
    for p in refconv_prefixes(end):
        assert torch.equal(end[p + 'weight'], base[p + 'weight']), p


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason='needs gloo')
def test_two_process_refocus_training(workflow, tmp_path):
    """torchrun, 2 processes, gloo on CPU, --launcher pytorch as mmdet/mmseg use it."""
    w = workflow
    cfg = osp.join(w['work'], 'refconv_dist.py')
    with open(cfg, 'w') as f:
        f.write("_base_ = './refconv.py'\n"
                "custom_imports = dict(imports=['refconv_mm', 'probe_hooks'])\n"
                "custom_hooks = [dict(type='RefConvHook'), dict(type='RankDumpHook')]\n"
                "train_dataloader = dict(batch_size=1)\n")
    work = str(tmp_path / 'dist')
    run_tool('-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
             str(29500 + os.getpid() % 1000), 'tools/train.py', cfg, '--launcher', 'pytorch',
             '--work-dir', work, '--cfg-options', f"load_from={w['base']}",
             env=dict(PYTHONPATH=TESTS, OMP_NUM_THREADS='1'))
    r0 = torch.load(osp.join(work, 'after_train_rank0.pth'), map_location='cpu')
    r1 = torch.load(osp.join(work, 'after_train_rank1.pth'), map_location='cpu')
    assert r0['wrapper'] == r1['wrapper'] == 'DeviceAgnosticDDP'
    base = load_sd(w['base'])
    prefixes = refconv_prefixes(r0['state_dict'])
    for p in prefixes:
        for r in (r0, r1):
            assert torch.equal(r['state_dict'][p + 'weight'], base[p + 'weight']), p
        torch.testing.assert_close(r0['state_dict'][p + 'refocus_weight'],
                                   r1['state_dict'][p + 'refocus_weight'], atol=0, rtol=0)
        moved = bool(r0['state_dict'][p + 'refocus_weight'].abs().sum() > 0)
        assert moved != p.startswith(frozen_by_model(w['task'])), p


@pytest.mark.parametrize('task', ['det', 'det-model', 'seg'])
def test_mim_train_with_plugin_config(task, det_data, seg_data, tmp_path):
    """`mim train mmdet|mmseg CONFIG` runs mmdet's/mmseg's own train.py on a RefConv config."""
    data = seg_data if task == 'seg' else det_data
    paths = write_configs(task, str(tmp_path), data, iters=1, refocus_iters=1, size=64, batch=2)
    pytest.importorskip('mim', reason='openmim is not installed')
    out = run_tool(*MIM, 'train', 'mmseg' if task == 'seg' else 'mmdet', paths['refconv'],
                   '--gpus', '0', '--work-dir', str(tmp_path / 'w'))
    log = out.stdout + out.stderr
    assert 'RefConvHook: ' in log and 'RefConv layers' in log
    sd = load_sd(str(tmp_path / 'w' / 'iter_1.pth'))
    assert refconv_prefixes(sd)
