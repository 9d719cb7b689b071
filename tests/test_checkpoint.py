"""mmengine checkpoints under torch's weights-only loading, written by a real Runner."""
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner, load_checkpoint

import refconv_mm  # noqa: F401
from refconv_mm.checkpoint import load_checkpoint_file, safe_torch_load
from refconv_mm.compat import torch_version
from refconv_mm.experiments.shapes_configs import write_config_pair

# torch >= 2.6 loads weights-only by default; older torch only when asked (weights_only=True).
WEIGHTS_ONLY_DEFAULT = torch_version() >= (2, 6, 0)


@pytest.fixture(scope='module')
def trained(det_data, tmp_path_factory):
    work = str(tmp_path_factory.mktemp('ckpt_run'))
    paths = write_config_pair(work, det_data['data_root'], 'det', iters=2, size=64, batch=2,
                              log_interval=1)
    cfg = Config.fromfile(paths['baseline'])
    cfg.work_dir = work
    runner = Runner.from_cfg(cfg)
    runner.train()
    ckpt = osp.join(work, 'iter_2.pth')
    assert osp.isfile(ckpt)
    return dict(work=work, ckpt=ckpt, paths=paths, model=runner.model)


def test_runner_checkpoint_needs_the_allow_list(trained):
    # Without refconv_mm, torch's weights-only loading refuses mmengine's own checkpoint (the
    # default on torch >= 2.6; asked for explicitly on older torch, whose unpickler refuses
    # any non-tensor object).
    arg = '' if WEIGHTS_ONLY_DEFAULT else ', weights_only=True'
    code = f'import sys, torch; torch.load(sys.argv[1]{arg}); print("loaded")'
    bare = subprocess.run([sys.executable, '-c', code, trained['ckpt']], capture_output=True,
                          text=True)
    assert bare.returncode != 0 and 'UnpicklingError' in bare.stderr, bare.stderr[-2000:]
    if WEIGHTS_ONLY_DEFAULT:
        assert 'HistoryBuffer' in bare.stderr
        fixed = 'import refconv_mm; ' + code
    else:  # old torch cannot extend its unpickler: refconv_mm's loader carries the allow-list
        fixed = ('import sys, refconv_mm.checkpoint as c; c.safe_torch_load(sys.argv[1]); '
                 'print("loaded")')
    fixed = subprocess.run([sys.executable, '-c', fixed, trained['ckpt']],
                           capture_output=True, text=True)
    assert fixed.returncode == 0 and 'loaded' in fixed.stdout, fixed.stderr[-2000:]
    ckpt = load_checkpoint_file(trained['ckpt'])
    assert 'message_hub' in ckpt and ckpt['meta']['iter'] == 2


def test_load_from_and_pretrained_init(trained, tmp_path):
    cfg = Config.fromfile(trained['paths']['baseline'])
    cfg.work_dir = str(tmp_path)
    cfg.load_from = trained['ckpt']
    cfg.train_cfg.max_iters = 3
    runner = Runner.from_cfg(cfg)
    runner.train()  # loads with weights_only=True (torch's default) through mmengine
    assert runner.iter == 3
    # init_cfg=dict(type='Pretrained') goes through the same loader.
    cfg2 = Config.fromfile(trained['paths']['baseline'])
    cfg2.model.init_cfg = dict(type='Pretrained', checkpoint=trained['ckpt'])
    from refconv_mm.verify import build_model
    model = build_model(cfg2)
    model.init_weights()
    sd = torch.load(trained['ckpt'], map_location='cpu')['state_dict']
    assert torch.equal(model.state_dict()['backbone.conv1.weight'], sd['backbone.conv1.weight'])


def test_resume_restores_iteration_and_optimizer(trained, tmp_path):
    cfg = Config.fromfile(trained['paths']['baseline'])
    cfg.work_dir = str(tmp_path)
    cfg.resume = True
    cfg.load_from = trained['ckpt']
    cfg.train_cfg.max_iters = 4
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    ckpt = torch.load(osp.join(str(tmp_path), 'iter_4.pth'), map_location='cpu')
    assert ckpt['meta']['iter'] == 4 and ckpt['optimizer']['state']


class Evil:
    def __reduce__(self):
        return (print, ('pwned',))


class Plain:
    """An ordinary user object: not a weight, not one of mmengine's types."""


class SneakyGetattr:
    """Reaches past the allow-listed type through getattr."""

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer
        return (getattr, (HistoryBuffer, '__init__'))


@pytest.mark.parametrize('payload', [Evil(), Plain(), SneakyGetattr()])
def test_foreign_pickles_still_refused(tmp_path, payload, capsys):
    """Refused by mmengine's loader, refconv_mm's and torch's weights-only one, on every torch."""
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict={}, meta=dict(x=payload)), path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(torch.nn.Linear(1, 1), path)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(path)
    with pytest.raises(ValueError, match='non-weight objects'):
        load_checkpoint_file(path)
    with pytest.raises(pickle.UnpicklingError):
        if WEIGHTS_ONLY_DEFAULT:
            torch.load(path)
        else:
            torch.load(path, weights_only=True)
    assert 'pwned' not in capsys.readouterr().out  # nothing ran
