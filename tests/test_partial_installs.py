"""refconv_mm with only one of mmdet / mmseg / mmpretrain installed.

Each case runs in a real virtual environment of its own whose site-packages is this
environment's minus the other two packages (their module folders and dist-info are simply
not there), so ``import mmseg`` fails there exactly as on a detection user's machine. In it:
``import refconv_mm``, the conv_cfg route trained by ``tools/train.py`` with RefConvHook,
``tools/merge_refconv.py --verify``, and ``RefConvModel``.
"""
import os
import os.path as osp
import subprocess
import sys
import sysconfig

import pytest

from refconv_mm.experiments.shapes_configs import refconv_model_override, write_config_pair

from .conftest import ROOT

PACKAGES = {'mmdet': ('mmdet', 'mmdet'), 'mmseg': ('mmseg', 'mmsegmentation'),
            'mmpretrain': ('mmpretrain', 'mmpretrain')}
TASK = {'mmdet': 'det', 'mmseg': 'seg', 'mmpretrain': 'cls'}


def _normalized(name: str) -> str:
    return name.lower().replace('-', '_')


def env_without(root: str, hidden) -> str:
    """A venv at ``root`` seeing this environment's packages except ``hidden``; its python."""
    base = osp.join(sys.base_prefix, 'bin', 'python%d.%d' % sys.version_info[:2])
    subprocess.run([base, '-m', 'venv', '--without-pip', root], check=True)
    view = osp.join(root, 'view')
    os.makedirs(view)
    drop_mods = {PACKAGES[h][0] for h in hidden}
    drop_dists = {_normalized(PACKAGES[h][1]) for h in hidden}
    site = sysconfig.get_paths()['purelib']
    for name in os.listdir(site):
        dist = _normalized(name.split('-')[0]) if name.endswith(('.dist-info', '.egg-info')) \
            else None
        if name in drop_mods or dist in drop_dists:
            continue
        os.symlink(osp.join(site, name), osp.join(view, name))
    py = osp.join(root, 'bin', 'python')
    venv_site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()'
                                "['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip()
    # addsitedir (not a plain path line) so the view's own .pth files are processed too
    with open(osp.join(venv_site, 'view.pth'), 'w') as f:
        f.write(f'import site; site.addsitedir({view!r})\n')
    return py


def run(py, *args, timeout=600):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    proc = subprocess.run([py, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, f'{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def cls_data(tmp_path_factory):
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from refconv_mm.experiments.shapes_data import make_classification_set
    return make_classification_set(str(tmp_path_factory.mktemp('partial_cls')), num_train=8,
                                   num_val=4, size=32)


@pytest.mark.parametrize('only', sorted(PACKAGES))
def test_works_with_only_one_downstream_package(only, request, tmp_path):
    pytest.importorskip(PACKAGES[only][0], reason=f'{only} is not installed here')
    hidden = [p for p in PACKAGES if p != only]
    py = env_without(str(tmp_path / 'venv'), hidden)
    probe = ('import importlib.util, refconv_mm; '
             f'gone = [m for m in {[PACKAGES[h][0] for h in hidden]!r} '
             'if importlib.util.find_spec(m) is not None]; '
             'assert not gone, gone; '
             f'import {PACKAGES[only][0]}; '
             f'print("only {only}: refconv_mm", refconv_mm.__version__)')
    assert f'only {only}: refconv_mm' in run(py, '-c', probe)

    data = request.getfixturevalue(dict(det='det_data', seg='seg_data', cls='cls_data')
                                   [TASK[only]])
    work = str(tmp_path / 'w')
    paths = write_config_pair(work, data['data_root'], TASK[only], iters=1, refocus_iters=1,
                              size=32 if only == 'mmpretrain' else 64, batch=2)
    # conv_cfg route + RefConvHook, through the tool users run
    log = run(py, 'tools/train.py', paths['refconv'], '--work-dir', osp.join(work, 'ref'))
    assert 'RefConvHook: ' in log
    merged = osp.join(work, 'merged.pth')
    log = run(py, 'tools/merge_refconv.py', paths['refconv'], osp.join(work, 'ref', 'iter_1.pth'),
              merged, '--verify')
    assert 'verify:' in log and osp.isfile(merged)
    # the whole-model route: RefConvModel around the ORIGINAL config's model
    model_cfg = write_config_pair(osp.join(work, 'model'), data['data_root'], TASK[only],
                                  iters=1, refocus_iters=1, size=64, batch=2,
                                  override=refconv_model_override())['refconv']
    code = ('import sys; from mmengine.config import Config; import refconv_mm; '
            'from refconv_mm.verify import build_model; '
            'm = build_model(Config.fromfile(sys.argv[1])); '
            'print("refconv layers", sum(isinstance(x, refconv_mm.RefConv2d) '
            'for x in m.modules()))')
    out = run(py, '-c', code, model_cfg)
    assert int(out.split('refconv layers')[1].split()[0]) > 0
