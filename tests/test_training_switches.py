"""Training switches at the Runner level: mmengine AMP (``--amp``) and EMAHook on refocus runs.

Real Runners (tools/train.py and tools/test.py in subprocesses, or in process where a test
needs the Runner between calls), real mmdet RetinaNet and mmseg FCN configs from the installed
packages, real checkpoints on disk. The refocused model and the merged one (ORIGINAL config)
must give the same predictions: bit for bit, under AMP as in fp32.
"""
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from refconv_mm.experiments.shapes_configs import write_config_pair

from .conftest import ROOT, run_tool

TESTS = osp.dirname(osp.abspath(__file__))
AMP_EXTRA = ("custom_imports = dict(imports=['refconv_mm', 'cpu_amp'], "
             "allow_failed_imports=False)\n"
             "optim_wrapper = dict(type='CPUAmpOptimWrapper', loss_scale='dynamic')\n")


def assert_same_predictions(a, b, where=''):
    """Every tensor, number and string of two dumped prediction lists is equal (exact)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same_predictions(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_predictions(x, y, f'{where}[{i}]')
    elif hasattr(a, 'shape'):  # numpy arrays (mmseg keeps some)
        assert (a == b).all(), where
    else:
        assert a == b, (where, a, b)


def load_dump(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


@pytest.fixture(scope='module', params=['det', 'seg'])
def amp_run(request, det_data, seg_data, tmp_path_factory):
    """fp32 baseline -> refocus under AMP (validation in fp32 and under AMP) -> merge."""
    task = request.param
    data = seg_data if task == 'seg' else det_data
    work = str(tmp_path_factory.mktemp(f'amp_{task}'))
    # 128x128 detection images: at 64x64 RetinaNet's P7 conv sees a 1x1 input, where torch's
    # CPU bf16 conv backward returns non-finite weight gradients about one call in four (plain
    # nn.Conv2d too), and the loss scaler then skips every step.
    paths = write_config_pair(work, data['data_root'], task, iters=4, refocus_iters=4,
                              size=128 if task == 'det' else 64, batch=2, log_interval=1,
                              val_interval=2, refconv_extra=AMP_EXTRA)
    run_tool('tools/train.py', paths['baseline'], '--work-dir', osp.join(work, 'base'))
    base = osp.join(work, 'base', 'iter_4.pth')
    # AMP training steps, then the ValLoop in fp32 (its default): mmdet's frozen stem and
    # stage 1 compute their kernels inside the AMP step, and validation must not care.
    out = run_tool('tools/train.py', paths['refconv'], '--work-dir', osp.join(work, 'ref'),
                   '--cfg-options', f'load_from={base}', env=dict(PYTHONPATH=TESTS))
    ref = osp.join(work, 'ref', 'iter_4.pth')
    merged = osp.join(work, 'merged.pth')
    run_tool('tools/merge_refconv.py', paths['refconv'], ref, merged, env=dict(PYTHONPATH=TESTS))
    return dict(task=task, work=work, paths=paths, ref=ref, merged=merged,
                log=out.stdout + out.stderr)


def test_amp_refocus_run_trains_and_validates(amp_run):
    log = amp_run['log']
    key = 'mIoU' if amp_run['task'] == 'seg' else 'coco/bbox_mAP'
    assert log.count(f'{key}:') >= 2, log[-3000:]  # both validations ran (iters 2 and 4)
    ckpt = torch.load(amp_run['ref'], map_location='cpu')
    assert 'loss_scaler' in ckpt['optimizer']  # AmpOptimWrapper's state: the AMP path ran
    assert ckpt['optimizer']['loss_scaler']['scale'] > 0
    sd = ckpt['state_dict']
    refocus = [k for k in sd if k.endswith('refocus_weight')]
    moved = [k for k in refocus if sd[k].abs().sum() > 0]  # zero init: moved = trained
    assert len(moved) >= len(refocus) // 2, (len(moved), len(refocus))
    assert all(sd[k].dtype == torch.float32 and torch.isfinite(sd[k]).all() for k in refocus)


@pytest.mark.parametrize('amp', [True, False], ids=['amp', 'fp32'])
def test_merged_original_config_equals_refocused(amp_run, amp):
    """tools/test.py with the ORIGINAL config and the merged checkpoint, under AMP (the test
    loop's fp16=True: bf16 autocast on a CPU) and in fp32: the refocused model's predictions.

    mmcv's CPU NMS has no bf16 kernel (the plain detector fails there too), so the detector
    under AMP is compared on its raw head outputs over the real test batches instead.
    """
    w = amp_run
    if amp and w['task'] == 'det':
        return _compare_det_outputs_under_amp(w)
    opts = ['--cfg-options', f'test_cfg.fp16={amp}']
    dumps = {}
    for name, cfg, ckpt in (('ref', w['paths']['refconv'], w['ref']),
                            ('merged', w['paths']['baseline'], w['merged'])):
        dumps[name] = osp.join(w['work'], f'{name}_{amp}.pkl')
        run_tool('tools/test.py', cfg, ckpt, '--work-dir', osp.join(w['work'], f't_{name}'),
                 '--out', dumps[name], *opts, env=dict(PYTHONPATH=TESTS))
    ref, merged = load_dump(dumps['ref']), load_dump(dumps['merged'])
    assert len(ref) == len(merged) > 0
    assert_same_predictions(ref, merged)


def _compare_det_outputs_under_amp(w) -> None:
    from mmengine.config import Config
    from mmengine.runner import Runner

    from refconv_mm.checkpoint import load_checkpoint_file
    from refconv_mm.verify import build_model
    models = {}
    for name, cfg_path, ckpt in (('ref', w['paths']['refconv'], w['ref']),
                                 ('merged', w['paths']['baseline'], w['merged'])):
        cfg = Config.fromfile(cfg_path, import_custom_modules=False)  # no optimizer here
        model = build_model(cfg)
        model.load_state_dict(load_checkpoint_file(ckpt)['state_dict'], strict=True)
        models[name] = model.eval()
    loader = Runner.build_dataloader(cfg.test_dataloader)
    n = 0
    for batch in loader:
        outs = {}
        for name, model in models.items():
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                data = model.data_preprocessor(batch, False)
                outs[name] = model(data['inputs'], data['data_samples'], mode='tensor')
        assert outs['ref'][0][0].dtype == torch.bfloat16
        assert_same_predictions(outs['ref'], outs['merged'])
        n += 1
    assert n > 0


def test_amp_flag_on_cpu_is_one_line(det_data, tmp_path):
    paths = write_config_pair(str(tmp_path), det_data['data_root'], 'det', iters=1, size=64,
                              batch=2)
    proc = run_tool('tools/train.py', paths['refconv'], '--amp', '--work-dir',
                    str(tmp_path / 'w'), check=False, timeout=300)
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU: --amp runs')
    assert proc.returncode == 2, proc.stderr[-2000:]
    # one line of ours (the stack's own import warnings may precede it), no traceback
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('tools/train.py:')]
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'AmpOptimWrapper' in lines[0] and 'without --amp' in lines[0]
    assert proc.stderr.rstrip().endswith(lines[0])


# -- EMA ---------------------------------------------------------------------------------
EMA_HOOKS = ("custom_hooks = [dict(type='RefConvHook', merge_after_run=True),\n"
             "                dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.5,\n"
             "                     gamma=1, update_buffers=True, priority=49)]\n")


def _dump_evaluators(cfg, path):
    for key in ('val_evaluator', 'test_evaluator'):
        ev = cfg[key]
        ev = list(ev) if isinstance(ev, (list, tuple)) else [ev]
        cfg[key] = ev + [dict(type='DumpResults', out_file_path=path)]


@pytest.fixture(scope='module')
def ema_run(det_data, tmp_path_factory):
    """An RTMDet-style EMAHook (ExpMomentumEMA) on a RetinaNet refocus run, in process."""
    work = str(tmp_path_factory.mktemp('ema'))
    paths = write_config_pair(work, det_data['data_root'], 'det', iters=4, refocus_iters=4,
                              size=64, batch=2, log_interval=1, val_interval=2,
                              refconv_extra=EMA_HOOKS)
    run_tool('tools/train.py', paths['baseline'], '--work-dir', osp.join(work, 'base'))
    return dict(work=work, paths=paths, base=osp.join(work, 'base', 'iter_4.pth'))


def _runner(cfg_path, work_dir, dump, **overrides):
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(cfg_path)
    cfg.work_dir = work_dir
    cfg.merge_from_dict(overrides)
    _dump_evaluators(cfg, dump)
    return Runner.from_cfg(cfg)


def _plain_predictions(w, merged_ckpt: str, name: str):
    """The ORIGINAL config's test loop on a merged checkpoint (in process)."""
    dump = osp.join(w['work'], f'{name}.pkl')
    _runner(w['paths']['baseline'], osp.join(w['work'], name), dump,
            load_from=merged_ckpt).test()
    return load_dump(dump)


def test_ema_validates_merges_and_tests_the_ema_model(ema_run):
    """The refocused model predicts exactly what the merged checkpoint predicts with the
    ORIGINAL config, in every order of val/test calls a Runner makes, and the merged checkpoint
    (RefConvHook's and tools/merge_refconv.py's alike) holds the EMA weights."""
    from refconv_mm.checkpoint import save_merged_checkpoint
    from refconv_mm.merge import merge_state_dict, refconv_prefixes
    w = ema_run
    dump = osp.join(w['work'], 'dump.pkl')
    runner = _runner(w['paths']['refconv'], osp.join(w['work'], 'ref'), dump,
                     load_from=w['base'])
    runner.train()  # validates at iters 2 and 4, EMA weights swapped in
    in_train = load_dump(dump)
    src_state = {k: v.clone() for k, v in runner.model.state_dict().items()}  # not EMA
    hook_file = osp.join(w['work'], 'ref', 'refconv_merged.pth')
    hook_merged = torch.load(hook_file, map_location='cpu')['state_dict']
    tool_merged = osp.join(w['work'], 'merged.pth')
    run_tool('tools/merge_refconv.py', w['paths']['refconv'],
             osp.join(w['work'], 'ref', 'iter_4.pth'), tool_merged)
    tool_sd = torch.load(tool_merged, map_location='cpu')['state_dict']
    assert set(hook_merged) == set(tool_sd)
    for k in tool_sd:
        assert torch.equal(hook_merged[k], tool_sd[k]), k
    # ... and they are the EMA weights: the trained weights merge to something else
    src_merged = merge_state_dict(src_state)
    trained = [p for p in refconv_prefixes(src_state)
               if not p.startswith(('backbone.conv1.', 'backbone.layer1.'))]
    assert trained and all(not torch.equal(src_merged[p + 'weight'], tool_sd[p + 'weight'])
                           for p in trained)
    want = _plain_predictions(w, tool_merged, 'plain_ema')
    assert_same_predictions(in_train, want, 'val in train')

    # A fresh Runner that evaluates the refocused checkpoint (EMAHook loads its EMA weights).
    fresh = _runner(w['paths']['refconv'], osp.join(w['work'], 'fresh'), dump,
                    load_from=osp.join(w['work'], 'ref', 'iter_4.pth'))
    for i, call in enumerate(('val', 'test', 'test', 'val')):
        getattr(fresh, call)()
        assert_same_predictions(load_dump(dump), want, f'fresh runner, call {i}: {call}')

    # The training Runner, evaluated again: mmengine's EMAHook rebuilds its EMA copy from the
    # model at every run's start, so these calls evaluate the trained (non-EMA) weights; the
    # refocused model still predicts what those weights merge to, and the export stays EMA.
    save_merged_checkpoint(src_state, osp.join(w['work'], 'merged_src.pth'))
    want_src = _plain_predictions(w, osp.join(w['work'], 'merged_src.pth'), 'plain_src')
    for i, call in enumerate(('test', 'val', 'test')):
        getattr(runner, call)()
        assert_same_predictions(load_dump(dump), want_src, f'same runner, call {i}: {call}')
    again = torch.load(hook_file, map_location='cpu')['state_dict']
    assert all(torch.equal(again[k], tool_sd[k]) for k in tool_sd)


# -- activation checkpointing --------------------------------------------------------------
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'amp'])
def test_resnet_with_cp_same_gradients(amp, monkeypatch):
    """mmdet's ResNet ``with_cp=True`` (activation checkpointing in every block) with RefConv:
    the recompute in backward gives the gradients of the run without checkpointing."""
    import copy

    import torch.utils.checkpoint as cp
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = dict(type='ResNet', depth=18, frozen_stages=1, norm_eval=False,
               conv_cfg=dict(type='RefConv', init='official'))
    torch.manual_seed(0)
    reference = MODELS.build(cfg)
    reference.init_weights()
    checkpointed = copy.deepcopy(reference)
    for m in checkpointed.modules():
        if hasattr(m, 'with_cp'):
            m.with_cp = True
    calls = []
    real = cp.checkpoint
    monkeypatch.setattr(cp, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for model in (reference, checkpointed):
        model.train()
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) >= 4  # the blocks after the frozen stage 1 were checkpointed
    assert grads[0].keys() == grads[1].keys() and any('refocus' in k for k in grads[0])
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize('tool', ['tools/train.py', 'tools/test.py'])
def test_launcher_pytorch_outside_torchrun_is_one_line(tool, det_data, tmp_path):
    """DDP's launcher started without torchrun: one line naming the missing variables and the
    torchrun command, exit 2 (it was a bare ``KeyError: 'RANK'``)."""
    paths = write_config_pair(str(tmp_path), det_data['data_root'], 'det', iters=1, size=64,
                              batch=2)
    args = [paths['refconv']] + (['ckpt.pth'] if tool.endswith('test.py') else [])
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'MASTER_PORT')}
    proc = subprocess.run([sys.executable, tool, *args, '--launcher', 'pytorch'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(tool + ':')]
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'RANK' in lines[0] and 'WORLD_SIZE' in lines[0] and 'torchrun' in lines[0]
