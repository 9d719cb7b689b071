"""Deploy: refocused checkpoint -> merged -> mmdeploy ONNX export -> ONNX Runtime, on CPU.

Real installed configs (RetinaNet-R18, FCN-R18-D8, ResNet-18), the whole-model RefConv route
with random non-zero refocusing weights (so the merge changes every kernel), small inputs.
"""
import contextlib
import hashlib
import io
import json
import os.path as osp
import re
import sys

import pytest
import torch
from mmengine.config import Config

from .conftest import ROOT, run_tool

pytest.importorskip('mmdeploy')
pytest.importorskip('onnxruntime')

sys.path.insert(0, osp.join(ROOT, 'tools'))
import deploy_onnx  # noqa: E402

from refconv_mm import deploy  # noqa: E402
from refconv_mm.verify import build_model  # noqa: E402

BASES = {'det': 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
         'seg': 'mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py',
         'cls': 'mmpretrain::resnet/resnet18_8xb32_in1k.py'}
# mmdeploy's mmpretrain input keeps the config's test crop (224) whatever the deploy shape
SHAPE = {'det': (96, 96), 'seg': (64, 64), 'cls': (224, 224)}
# ORT vs PyTorch, fp32 on CPU: atol + rtol * max|output| (the tool's defaults).
ATOL, RTOL = 1e-6, 1e-4


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_refocused(task, d):
    """RefConv config over the installed config, and a checkpoint with refocusing weights."""
    cfg_path = osp.join(d, f'{task}_refconv.py')
    with open(cfg_path, 'w') as f:
        f.write(f"_base_ = '{BASES[task]}'\n"
                "custom_imports = dict(imports=['refconv_mm'], allow_failed_imports=False)\n"
                "model = dict(_delete_=True, type='RefConvModel', model=_base_.model)\n")
    orig = osp.join(d, f'{task}_orig.py')  # the installed config, untouched
    with open(orig, 'w') as f:
        f.write(f"_base_ = '{BASES[task]}'\n")
    model = build_model(Config.fromfile(cfg_path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('refocus_weight'):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = model.state_dict()
    ckpt = osp.join(d, f'{task}_ref.pth')
    torch.save(dict(meta={}, state_dict=sd), ckpt)
    plain = osp.join(d, f'{task}_plain.pth')  # the basis alone: the model before refocusing
    torch.save(dict(meta={}, state_dict={k: v for k, v in sd.items()
                                         if not k.endswith('refocus_weight')}), plain)
    return dict(cfg=cfg_path, orig=orig, ckpt=ckpt, plain=plain, dir=d)


_EXPORTED = {}


def _export(task, tmp_path_factory):
    if task not in _EXPORTED:
        _EXPORTED[task] = _run_export(task, tmp_path_factory)
    return _EXPORTED[task]


@pytest.fixture(scope='module', params=['det', 'seg', 'cls'])
def exported(request, tmp_path_factory):
    """Each model through tools/deploy_onnx.py --verify."""
    return _export(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def cls_case(tmp_path_factory):
    """The classifier: the cheapest model, for checks that do not depend on the model."""
    return _export('cls', tmp_path_factory)


def _run_export(task, tmp_path_factory):
    """The detector runs as a real subprocess, the others in-process through cli()."""
    d = str(tmp_path_factory.mktemp(f'deploy_{task}'))
    m = make_refocused(task, d)
    hashes = {p: sha(m[p]) for p in ('cfg', 'ckpt')}
    out, report = osp.join(d, f'{task}.onnx'), osp.join(d, f'{task}.json')
    args = [m['cfg'], m['ckpt'], out, '--shape', *map(str, SHAPE[task]), '--verify',
            '--json', report, '--save-merged', osp.join(d, 'merged.pth')]
    if task == 'det':
        log = run_tool('tools/deploy_onnx.py', *args).stdout
    else:
        if task == 'cls':
            args += ['--bench', '1']
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert deploy_onnx.cli(args) == 0
        log = buf.getvalue()
    assert {p: sha(m[p]) for p in ('cfg', 'ckpt')} == hashes  # inputs untouched
    with open(report) as f:
        return dict(m, task=task, out=out, report=json.load(f), log=log)


def test_ort_matches_pytorch_and_graph_is_plain(exported):
    r = exported['report']
    assert r['max_diff'] <= ATOL + RTOL * r['scale'], r
    # exactly the convs the plain model runs, each with a constant (merged) weight
    assert r['conv_nodes'] == r['torch_convs'] == r['const_weight_convs'] > 10
    assert r['ops'].get('BatchNormalization', 0) == 0  # BN folded into constant conv weights
    if exported['task'] == 'det':
        assert 'verify: max |onnxruntime - pytorch|' in exported['log']
        assert r['conv_nodes'] == 78  # R18 20 + FPN 8 + head 10 convs x 5 levels


def test_onnx_equals_refocused_model(exported):
    """The deployed file, in ONNX Runtime, computes what the UNMERGED refocused model computes
    in PyTorch (eval-cache kernel), through mmdeploy's rewritten forward."""
    m = exported
    cfg = Config.fromfile(m['cfg'])
    dc = deploy.deploy_config(deploy.codebase_of(cfg), SHAPE[m['task']])
    r = deploy.compare_with_pytorch(m['out'], cfg, m['ckpt'], dc, SHAPE[m['task']])
    assert r['max_diff'] <= ATOL + RTOL * r['scale'], (r['max_diff'], r['scale'])
    # and not what the un-refocused basis computes: the merge changed the function
    plain_cfg = Config.fromfile(m['orig'])
    p = deploy.compare_with_pytorch(m['out'], plain_cfg, m['plain'], dc, SHAPE[m['task']])
    assert p['max_diff'] > max(ATOL + RTOL * p['scale'], 100 * r['max_diff']), p['max_diff']


def test_same_graph_as_plain_model_export(cls_case):
    """--bench exports the plain (basis) model with the ORIGINAL config: the merged graph has
    the same nodes and initializer shapes, and ONNX Runtime timed both."""
    m = re.search(r'same ops and initializer shapes: (\w+); onnxruntime median latency merged '
                  r'([\d.]+) ms, plain ([\d.]+) ms', cls_case['log'])
    assert m, cls_case['log']
    assert m.group(1) == 'True' and float(m.group(2)) > 0 and float(m.group(3)) > 0


def test_unmerged_export_is_refused(cls_case, tmp_path):
    """Through the API: a RefConv config, or a refocused checkpoint with the ORIGINAL config
    (which mmdeploy's non-strict load would turn into a silent export of the basis)."""
    out = str(tmp_path / 'x.onnx')
    with pytest.raises(ValueError, match='tools/merge_refconv.py'):
        deploy.export_onnx(Config.fromfile(cls_case['cfg']), cls_case['ckpt'], out, (64, 64))
    with pytest.raises(ValueError, match='refocus_weight.*tools/merge_refconv.py'):
        deploy.export_onnx(Config.fromfile(cls_case['orig']), cls_case['ckpt'], out, (64, 64))
    assert not osp.exists(out)


def _bad(capsys, *args):
    rc = deploy_onnx.cli([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_inputs(cls_case, tmp_path, capsys):
    m = cls_case
    out = tmp_path / 'o.onnx'
    # existing OUT without --force: refused, untouched
    out.write_bytes(b'keep')
    rc, err = _bad(capsys, m['cfg'], m['ckpt'], out)
    assert rc == 2 and 'exists; pass --force' in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b'keep'
    out.unlink()
    # truncated checkpoint
    trunc = tmp_path / 'trunc.pth'
    with open(m['ckpt'], 'rb') as f:
        trunc.write_bytes(f.read()[:5000])
    rc, err = _bad(capsys, m['cfg'], trunc, out)
    assert rc == 2 and 'cannot read checkpoint' in err and len(err.splitlines()) == 1
    # config not matching the checkpoint
    rc, err = _bad(capsys, m['cfg'], m['ckpt'], out, '--cfg-options',
                   'model.model.backbone.depth=34')
    assert rc == 2 and 'does not match checkpoint' in err and len(err.splitlines()) == 1
    # no RefConv weights
    rc, err = _bad(capsys, m['cfg'], m['plain'], out)
    assert rc == 2 and 'no RefConv weights' in err and len(err.splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.o.onnx')]

