"""Install hygiene: refconv_mm installs into an existing environment and changes nothing else.

Real pip (and mim) installs of a copy of this checkout's files (what a clone has) into real
virtual environments layered over the environment running the tests: each venv's own
site-packages starts empty and sees this environment's packages through a .pth line, as a
``--system-site-packages`` venv sees its base. pip resolves refconv_mm's requirements against
them; anything it would add, upgrade or replace lands in the venv's own site-packages and
shows in ``pip freeze``. So equal freezes before and after (refconv_mm's own line aside) prove
the install changes no other package, without touching this environment.
"""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from refconv_mm.experiments.shapes_configs import write_config_pair

from .conftest import ROOT

DOWNSTREAM = ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
              'mmpretrain')


def _run(cmd, cwd=None, timeout=900, **kw):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(kw.pop('env', {}))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)
    assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def src(tmp_path_factory):
    """The checkout's files as a clone has them (tracked and new, not ignored build output)."""
    dst = str(tmp_path_factory.mktemp('src') / 'refconv_mm_src')
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                           cwd=ROOT, capture_output=True, check=True).stdout.decode().split('\0')
    for rel in filter(None, files):
        if osp.isfile(osp.join(ROOT, rel)):
            os.makedirs(osp.dirname(osp.join(dst, rel)), exist_ok=True)
            shutil.copy2(osp.join(ROOT, rel), osp.join(dst, rel))
    return dst


def overlay_venv(root: str) -> str:
    """A venv over this environment (see the module docstring); returns its python."""
    base = osp.join(sys.base_prefix, 'bin', 'python%d.%d' % sys.version_info[:2])
    subprocess.run([base, '-m', 'venv', '--without-pip', root], check=True)
    py = osp.join(root, 'bin', 'python')
    own = _run([py, '-c', "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    here = sysconfig.get_paths()['purelib']
    with open(osp.join(own, 'overlay.pth'), 'w') as f:
        f.write(f'import site; site.addsitedir({here!r})\n')
    return py


def freeze(py: str) -> set:
    """``pip freeze --all`` of the venv, refconv_mm's own line left out."""
    def pip(*args):
        return subprocess.run([py, '-m', 'pip', *args, '--disable-pip-version-check'],
                              capture_output=True, text=True, check=True).stdout
    # an editable refconv_mm freezes as '-e /its/checkout', without its name
    own = {'-e ' + str(d.get('editable_project_location')) for d in
           json.loads(pip('list', '--format=json'))
           if d['name'].lower().replace('_', '-') == 'refconv-mm'}
    return {line for line in pip('freeze', '--all').splitlines()
            if line and 'refconv' not in line.lower() and line not in own}


def assert_only_refconv_mm_added(py: str, before: set, log: str) -> None:
    after = freeze(py)
    assert after == before, (f'changed: -{sorted(before - after)} +{sorted(after - before)}\n'
                             f'{log[-2000:]}')
    site = _run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip()
    # refconv_mm's own files: a dist-info (wheel, PEP 660) or an egg-link (legacy develop)
    ours = [n for n in os.listdir(site) if 'refconv' in n.lower().replace('-', '_')]
    others = set(os.listdir(site)) - set(ours) - {'overlay.pth', 'easy-install.pth',
                                                  '__pycache__'}
    assert ours and not others, (ours, others)  # nothing else landed in the venv


@pytest.fixture(scope='module')
def wheel_venv(src, tmp_path_factory):
    """``pip install .`` (the user's command: isolated build, dependencies resolved)."""
    py = overlay_venv(str(tmp_path_factory.mktemp('pip_install') / 'venv'))
    before = freeze(py)
    log = _run([py, '-m', 'pip', 'install', '--disable-pip-version-check', src])
    assert_only_refconv_mm_added(py, before, log)
    return py


def test_pip_install_changes_nothing_else_and_installs_a_copy(wheel_venv, tmp_path):
    out = _run([wheel_venv, '-c', 'import refconv_mm, torch; print(refconv_mm.__file__)'],
               cwd=str(tmp_path))
    assert osp.dirname(osp.dirname(wheel_venv)) in out and ROOT not in out  # not the checkout


@pytest.mark.parametrize('tool', ['pip', 'mim'])
def test_editable_install_changes_nothing_else(tool, src, tmp_path):
    """``pip install -e .`` and ``mim install -e .`` (mim calls pip with its own indexes)."""
    if tool == 'mim':
        pytest.importorskip('mim', reason='openmim is not installed')
    py = overlay_venv(str(tmp_path / 'venv'))
    before = freeze(py)
    cmd = [py, '-m', 'pip', 'install', '--disable-pip-version-check', '-e', src] \
        if tool == 'pip' else [py, '-c', 'import sys; from mim.cli import cli; sys.exit(cli())',
                               'install', '-e', src]
    log = _run(cmd, cwd=src)
    assert_only_refconv_mm_added(py, before, log)
    out = _run([py, '-c', 'import refconv_mm; print(refconv_mm.__file__)'], cwd=str(tmp_path))
    assert src in out


def test_wheel_carries_configs_tools_and_declares_ranges(src, tmp_path):
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
          '--disable-pip-version-check', '-w', str(tmp_path), src])
    (whl,) = [osp.join(str(tmp_path), n) for n in os.listdir(str(tmp_path)) if n.endswith('.whl')]
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    for name in ('configs/mmdet/retinanet_r50_fpn_refconv_1x_coco.py', 'tools/train.py',
                 'tools/merge_refconv.py', 'tools/test.py'):
        assert 'refconv_mm/.mim/' + name in names, name
    assert any(n.startswith('refconv_mm/.mim/configs/mmseg/') for n in names)
    assert 'Requires-Python: <3.12,>=3.8' in meta or 'Requires-Python: >=3.8,<3.12' in meta
    core = [line.split(':', 1)[1].strip() for line in meta.splitlines()
            if line.startswith('Requires-Dist:') and 'extra ==' not in line]
    assert core, meta
    for req in core:  # neither the user's torch/mmcv nor a pin
        name = req.split(';')[0].split('<')[0].split('>')[0].split('=')[0].strip().lower()
        assert name not in DOWNSTREAM and '==' not in req, req


def test_mim_train_mmdet_from_the_installed_wheel(wheel_venv, det_data, tmp_path):
    """`mim train mmdet CONFIG` with refconv_mm imported from the wheel, not the checkout."""
    pytest.importorskip('mim', reason='openmim is not installed')
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    paths = write_config_pair(str(tmp_path / 'cfg'), det_data['data_root'], 'det', iters=1,
                              refocus_iters=1, size=64, batch=2)
    where = _run([wheel_venv, '-c', 'import mim.utils as u, os.path as p; '
                  'd = u.get_installed_path("refconv_mm"); print(d); '
                  'print(p.isfile(p.join(d, ".mim", "configs", "mmdet", '
                  '"retinanet_r50_fpn_refconv_1x_coco.py")))'], cwd=str(tmp_path))
    assert osp.dirname(osp.dirname(wheel_venv)) in where and where.splitlines()[1] == 'True', where
    log = _run([wheel_venv, '-c', 'import sys; from mim.cli import cli; sys.exit(cli())',
                'train', 'mmdet', paths['refconv'], '--gpus', '0', '--work-dir',
                str(tmp_path / 'w')], cwd=str(tmp_path))
    assert 'RefConvHook: ' in log and 'RefConv layers' in log
    assert osp.isfile(str(tmp_path / 'w' / 'iter_1.pth'))
