import importlib.util
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(ROOT, 'configs')

os.environ.setdefault('OMP_NUM_THREADS', '2')
# Spinning OpenMP threads wait on each other on busy cores (3x the wall time on 2 cores).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


# Partial installs (a detection user without mmseg/mmpretrain, ...): an absent package's tests
# are skipped, with the reason in pytest's -ra summary.
DOWNSTREAM = ('mmdet', 'mmseg', 'mmpretrain')
MISSING = {p for p in DOWNSTREAM if importlib.util.find_spec(p) is None}
# modules whose shared fixtures build models of several packages
MODULE_NEEDS = {'test_stack': set(DOWNSTREAM), 'test_transfer': set(DOWNSTREAM),
                'test_inference_apis': set(DOWNSTREAM), 'test_deploy': set(DOWNSTREAM),
                'test_mmpretrain': {'mmpretrain'}, 'test_step_sharing': {'mmdet'},
                'test_converged_study': {'mmdet', 'mmpretrain'}}
# the task names tests are parametrized with, and the fixtures of each task's data/models
TASK_NEEDS = {'det': 'mmdet', 'det-model': 'mmdet', 'seg': 'mmseg', 'cls': 'mmpretrain'}
FIXTURE_NEEDS = {'det_data': 'mmdet', 'seg_data': 'mmseg', 'classifier': 'mmpretrain'}


def _needs(item) -> set:
    """The downstream packages a collected test uses: its module's, its params', its data's."""
    need = set(MODULE_NEEDS.get(item.module.__name__.split('.')[-1], ()))
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    values = []
    for v in params.values():
        values.extend(v if isinstance(v, (tuple, list)) else [v])
    found = set()
    for v in filter(lambda v: isinstance(v, str), values):
        found |= {p for p in DOWNSTREAM if v == p or v.startswith((p + '::', p + '/'))}
        found |= {TASK_NEEDS[v]} if v in TASK_NEEDS else set()
    if not found:  # no task in the params: the data fixtures say which package
        found = {p for f, p in FIXTURE_NEEDS.items() if f in item.fixturenames}
    return need | found


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    for item in items:
        for pkg in sorted(_needs(item) & MISSING):
            item.add_marker(pytest.mark.skip(
                reason=f'{pkg} is not installed: its part of the suite is skipped'))
            break


# Temp dirs that tests of several modules share; every other one goes when its module ends.
SESSION_DIRS = ('det_data', 'seg_data', 'cls_shapes')
_FAILED_TMP = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember a failed test's tmp_path, which the module clean-up keeps for inspection."""
    report = (yield).get_result()
    if report.failed and 'tmp_path' in getattr(item, 'funcargs', {}):
        _FAILED_TMP.add(osp.basename(str(item.funcargs['tmp_path'])))


def _forget_visualizers() -> None:
    """Drop mmengine's named Visualizers, so the next Runner builds its own.

    A Runner reuses a Visualizer by name ('visualizer' in mmdet's configs), save_dir included:
    every later Runner of the process would write into the first one's (deleted) work dir.
    """
    from mmengine.visualization import Visualizer
    classes = [Visualizer]
    while classes:
        cls = classes.pop()
        cls._instance_dict.clear()  # ManagerMeta gives each subclass a dict of its own
        classes.extend(cls.__subclasses__())


@pytest.fixture(scope='module', autouse=True)
def _free_module_tmp(tmp_path_factory):
    """Delete the temp dirs a module made (checkpoints of its runs) when the module ends.

    The disk is shared and sometimes has a few GB free; held to the session's end, the suite's
    checkpoints reach ~14 GB.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    _forget_visualizers()
    for name in set(os.listdir(base)) - before - _FAILED_TMP:
        if not name.startswith(SESSION_DIRS) and osp.isdir(osp.join(base, name)):
            shutil.rmtree(osp.join(base, name), ignore_errors=True)


# `mim` through its module: its console script need not sit beside this python (a venv layered
# over another environment has none)
MIM = ('-c', 'import sys; from mim.cli import cli; sys.exit(cli())')


def run_tool(*args, check=True, timeout=900, env=None):
    """Run a script of tools/ in a fresh interpreter; return the CompletedProcess."""
    cmd = list(args) if osp.isabs(args[0]) else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-3000:]}')
    return proc


@pytest.fixture(scope='session')
def det_data(tmp_path_factory):
    from refconv_mm.experiments.shapes_data import make_detection_set
    return make_detection_set(str(tmp_path_factory.mktemp('det_data')), num_train=12,
                              num_val=6, size=96)


@pytest.fixture(scope='session')
def seg_data(tmp_path_factory):
    from refconv_mm.experiments.shapes_data import make_segmentation_set
    return make_segmentation_set(str(tmp_path_factory.mktemp('seg_data')), num_train=8,
                                 num_val=4, size=64)
