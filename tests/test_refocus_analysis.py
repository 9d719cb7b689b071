"""tools/analysis_tools/refocus_analysis.py, run as a CLI on small hand-built checkpoints."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn

from refconv_mm import RefConv2d

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join('tools', 'analysis_tools', 'refocus_analysis.py')
OUT_FILES = ('relative_change.png', 'skeletons.png', 'redundancy.png', 'refocus_analysis.json')


def run_analysis(*args):
    env = {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
           'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def make_model(init: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        RefConv2d(3, 8, 3, padding=1, init=init),
        nn.BatchNorm2d(8),
        RefConv2d(8, 8, 3, padding=1, groups=8, init=init),  # depthwise: one group mixes all
        RefConv2d(8, 16, 1, init=init),  # 1x1: no skeleton
        RefConv2d(16, 16, (1, 5), padding=(0, 2), groups=4, init=init),
        nn.Conv2d(16, 4, 3),  # plain conv: not analysed
    )


def save(tmp_path, name, state_dict):
    path = tmp_path / name
    torch.save({'meta': {}, 'state_dict': state_dict}, str(path))
    return path


def reference_kernel(basis: np.ndarray, m: np.ndarray) -> np.ndarray:
    """W_b + T(W_b), loop by loop: T maps g consecutive 2-D kernels, zero padding m//2."""
    _, _, kh, kw = basis.shape
    n, g, mh, mw = m.shape
    flat = basis.reshape(n, kh, kw).astype(np.float64)
    out = flat.copy()
    for k in range(n):
        for c in range(g):
            src = flat[(k // g) * g + c]
            for y in range(kh):
                for x in range(kw):
                    for dy in range(mh):
                        for dx in range(mw):
                            yy, xx = y + dy - mh // 2, x + dx - mw // 2
                            if 0 <= yy < kh and 0 <= xx < kw:
                                out[k, y, x] += m[k, c, dy, dx] * src[yy, xx]
    return out.reshape(basis.shape)


def test_refocused_checkpoint(tmp_path):
    sd = make_model('official').state_dict()
    ckpt = save(tmp_path, 'refocused.pth', sd)
    out = tmp_path / 'analysis'
    proc = run_analysis(ckpt, '--out-dir', out)
    assert proc.returncode == 0, proc.stderr
    for name in OUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert str(out) in proc.stdout and 'summary: 4 RefConv layers' in proc.stdout

    report = json.loads((out / 'refocus_analysis.json').read_text())
    layers = {r['name']: r for r in report['layers']}
    assert list(layers) == ['0', '2', '3', '4']
    assert layers['4']['groups'] == 4 and layers['4']['kernel_shape'] == [16, 4, 1, 5]
    assert '3' not in report['skeleton_layers']  # 1x1 kernels have no skeleton
    for name in ('0', '2', '4'):  # independent of refocus_kernel
        basis = sd[name + '.weight'].double().numpy()
        ref = reference_kernel(basis, sd[name + '.refocus_weight'].double().numpy())
        want = np.linalg.norm(ref - basis) / np.linalg.norm(basis)
        assert want > 1e-3  # official init: T != 0
        assert abs(layers[name]['rel_change'] - want) < 1e-6
        assert np.allclose(layers[name]['skeleton_after'], np.abs(ref).mean(axis=(0, 1)))
        assert layers[name]['redundancy_before'] != layers[name]['redundancy_after']

    # Existing outputs are not overwritten without --force.
    proc = run_analysis(ckpt, '--out-dir', out)
    assert proc.returncode != 0 and '--force' in proc.stderr
    assert run_analysis(ckpt, '--out-dir', out, '--force', '--layers', r'^[24]$').returncode == 0
    report = json.loads((out / 'refocus_analysis.json').read_text())
    assert [r['name'] for r in report['layers']] == ['2', '4']


def test_zero_refocus_and_baseline(tmp_path):
    sd = make_model('zero').state_dict()
    ckpt = save(tmp_path, 'zero.pth', sd)
    plain = {k: v for k, v in sd.items() if not k.endswith('refocus_weight')}
    baseline = save(tmp_path, 'plain.pth', plain)
    proc = run_analysis(ckpt, '--baseline', baseline)  # default out-dir beside the checkpoint
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / 'refocus_analysis' / 'refocus_analysis.json').read_text())
    assert len(report['layers']) == 4
    for r in report['layers']:
        assert r['rel_change'] == 0
        assert r['redundancy_before'] == r['redundancy_after']
        assert r['skeleton_before'] == r['skeleton_after']
        assert r['basis_equals_baseline']
    assert 'equals the baseline weight in 4/4 layers' in proc.stdout


def test_refuses_plain_and_missing_checkpoints(tmp_path):
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).state_dict()
    for ckpt in (save(tmp_path, 'plain.pth', plain), tmp_path / 'missing.pth'):
        proc = run_analysis(ckpt, '--out-dir', tmp_path / 'out')
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('refocus_analysis: error:'), proc.stderr
    assert not (tmp_path / 'out').exists()
