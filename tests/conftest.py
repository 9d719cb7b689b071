import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(ROOT, 'configs')

os.environ.setdefault('OMP_NUM_THREADS', '2')
# Spinning OpenMP threads wait on each other on busy cores (3x the wall time on 2 cores).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


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
