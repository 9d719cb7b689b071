"""The libraries' own inference APIs on RefConv checkpoints (real configs, checkpoints trained
through the tools on the generated shapes data).

- The merged checkpoint with the ORIGINAL config, and the refocused (unmerged) checkpoint with
  its RefConv config, through mmdet's ``init_detector``/``inference_detector``, mmseg's
  ``init_model``/``inference_model`` and mmpretrain's ``ImageClassificationInferencer``, for
  both routes (``conv_cfg`` and the whole-model ``RefConvModel``): same predictions.
- mmdet's ``init_detector`` cannot build a ``RefConvModel`` config with ``cfg_options=None``:
  it evaluates ``'init_cfg' in config.model.backbone`` and raises ``AttributeError`` (a
  RefConvModel dict has no ``backbone``); any ``cfg_options`` (even ``{}``) skips that read,
  which the tests here use and docs/user_guide.md documents.

Tolerances: raw outputs and the APIs' scores/logits |merged - refocused| <= 1e-5 + 1e-5 *
max|output| (the tolerance of ``tools/merge_refconv.py --verify``); boxes 1e-3 px; labels and
classes equal wherever the decision is not a near-tie (a margin over twice the observed score
difference, which the perturbation cannot flip).
"""
import os
import os.path as osp
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn as nn

from refconv_mm import RefConv2d
from refconv_mm.checkpoint import load_checkpoint_file, save_merged_checkpoint
from refconv_mm.experiments.shapes_configs import (det_cpu_text, refconv_model_override,
                                                   write_config_pair)
from refconv_mm.experiments.shapes_data import CLASSES
from refconv_mm.merge import refconv_prefixes
from refconv_mm.verify import max_output_diff

from .conftest import ROOT
from .test_mmpretrain import CLS_SIZE, trained_classifier

ROUTES = ('conv_cfg', 'RefConvModel')
TASKS = ('det', 'seg', 'cls')
ATOL, RTOL = 1e-5, 1e-5
BASE_ITERS, REF_ITERS = 2, 1
# init='official' (documented RefConv option): every kernel is refocused visibly from step 0,
# so merged == refocused is a real check after one refocus iteration (zero init would leave
# the kernels within fp32 rounding of the bases).
REFOCUS_INIT = 'official'
# Per task: write_config_pair arguments. No validation while training (val_interval past the
# end): these runs only make checkpoints. RetinaNet's FPN/head at 64 channels (the demo's CPU
# sizing), pretrained-style (frozen stem/stage 1, as the original config).
CONFIG_ARGS = dict(
    det=dict(size=64, batch=2, extra=det_cpu_text(width=64, scratch=False)),
    seg=dict(size=64, batch=2),
    cls=dict(size=CLS_SIZE, batch=4),
)


def run_tools(jobs: Sequence[Sequence[str]], log_dir: str, parallel: int = 2) -> None:
    """Run ``tools/*.py`` jobs in fresh interpreters, ``parallel`` at a time (one thread each).

    The jobs are independent trainings; two at once halve the wall time on 2 cores. Output
    goes to ``log_dir/job<i>.log`` (a pipe would fill up and stall a waiting job).
    """
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    pending = list(enumerate(jobs))
    running: List[tuple] = []
    failures = []
    os.makedirs(log_dir, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            i, args = pending.pop(0)
            log = osp.join(log_dir, f'job{i}.log')
            with open(log, 'w') as f:
                proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                        stdout=f, stderr=subprocess.STDOUT)
            running.append((args, log, proc, time.monotonic()))
        time.sleep(0.2)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            args, log, proc, _ = job
            if proc.returncode != 0:
                with open(log) as f:
                    failures.append(f'{args} exited {proc.returncode}\n{f.read()[-3000:]}')
        for args, _, proc, start in running:
            if time.monotonic() - start > 900:
                proc.kill()
    assert not failures, '\n'.join(failures)


def _configs(task: str, work: str, data_root: str, base_ckpt: str,
             routes: Sequence[str] = ROUTES) -> Dict[str, Dict[str, str]]:
    """The routes' config pairs (identical ``baseline.py``) in ``work/<route>``."""
    return {route: write_config_pair(
        osp.join(work, route), data_root, task,
        override=refconv_model_override(init=REFOCUS_INIT) if route == 'RefConvModel' else None,
        refconv=dict(type='RefConv', init=REFOCUS_INIT), load_from=base_ckpt, iters=BASE_ITERS,
        refocus_iters=REF_ITERS, ckpt_interval=1,
        val_interval=1000, **CONFIG_ARGS[task]) for route in routes}


def _merge(ref: str, out: str) -> str:
    """The plain checkpoint of ``ref``, written as tools/merge_refconv.py writes it."""
    ckpt = load_checkpoint_file(ref)
    save_merged_checkpoint(ckpt['state_dict'], out, meta=ckpt.get('meta'))
    return out


@pytest.fixture(scope='module')
def runs(det_data, seg_data, tmp_path_factory) -> Dict[str, dict]:
    """Per task: the ORIGINAL config (``baseline``), the baseline checkpoint (``base``), a
    validation image, and per route the RefConv config, refocused and merged checkpoints.

    Phase 1 trains the det/seg baselines and refocuses the classifier (RefConvModel route; its
    conv_cfg route is the session's classifier); phase 2 refocuses det/seg by both routes.
    """
    root = str(tmp_path_factory.mktemp('infer'))
    cls = trained_classifier(tmp_path_factory)
    data = dict(det=det_data['data_root'], seg=seg_data['data_root'], cls=cls['data_root'])
    out = dict(cls=dict(baseline=cls['baseline'], base=cls['base'],
                        conv_cfg=dict(config=cls['refconv'], ref=cls['ref'],
                                      merged=cls['merged'])))
    configs = dict(cls=_configs('cls', osp.join(root, 'cls'), data['cls'], cls['base'],
                                routes=('RefConvModel', )))
    for task in ('det', 'seg'):
        base = osp.join(root, task, 'base', f'iter_{BASE_ITERS}.pth')
        configs[task] = _configs(task, osp.join(root, task), data[task], base)
        out[task] = dict(baseline=configs[task]['conv_cfg']['baseline'], base=base)
    refocus = {}
    for task, routes in configs.items():
        for route, paths in routes.items():
            work = osp.join(root, task, route)
            out[task][route] = dict(config=paths['refconv'],
                                    ref=osp.join(work, 'ref', f'iter_{REF_ITERS}.pth'),
                                    merged=osp.join(work, 'merged.pth'))
            refocus[task, route] = ('tools/train.py', paths['refconv'], '--work-dir',
                                    osp.join(work, 'ref'))
    baselines = [('tools/train.py', out[t]['baseline'], '--work-dir', osp.join(root, t, 'base'))
                 for t in ('det', 'seg')]
    run_tools(baselines + [refocus.pop(('cls', 'RefConvModel'))], osp.join(root, 'logs1'))
    run_tools(list(refocus.values()), osp.join(root, 'logs2'))
    for task in TASKS:
        for route in ROUTES:
            if not osp.isfile(out[task][route]['merged']):
                _merge(out[task][route]['ref'], out[task][route]['merged'])
    out['det']['image'] = osp.join(data['det'], 'val', 'val_0000.png')
    out['seg']['image'] = osp.join(data['seg'], 'img_dir', 'val', '0000.png')
    out['cls']['image'] = osp.join(data['cls'], 'val', 'rectangle', 'val_0000.png')
    return out


# ---------------------------------------------------------------- the APIs
def det_api(config: str, ckpt: str, image: str, cfg_options: Optional[dict] = None):
    """mmdet: init_detector + inference_detector; ``(model, {scores, bboxes, labels})``."""
    from mmdet.apis import inference_detector, init_detector
    model = init_detector(config, ckpt, device='cpu', cfg_options=cfg_options)
    pred = inference_detector(model, image).pred_instances
    return model, dict(scores=pred.scores, bboxes=pred.bboxes, labels=pred.labels)


def seg_api(config: str, ckpt: str, image: str):
    """mmseg: init_model + inference_model; ``(model, {logits, labels})``."""
    from mmseg.apis import inference_model, init_model
    model = init_model(config, ckpt, device='cpu')
    res = inference_model(model, image)
    return model, dict(logits=res.seg_logits.data, labels=res.pred_sem_seg.data)


def cls_api(config: str, ckpt: str, image: str):
    """mmpretrain: ImageClassificationInferencer; ``(model, {scores, label})``."""
    from mmengine.registry import init_default_scope
    from mmpretrain.apis import ImageClassificationInferencer

    # The inferencer builds its pipeline in the current default scope, which an earlier
    # mmdet/mmseg API call in this process set (PackInputs is mmpretrain's).
    init_default_scope('mmpretrain')
    inferencer = ImageClassificationInferencer(config, pretrained=ckpt, device='cpu')
    res = inferencer(image)[0]
    assert res['pred_class'] == CLASSES[res['pred_label']]  # classes from the checkpoint meta
    return inferencer.model, dict(scores=torch.as_tensor(res['pred_scores']),
                                  label=res['pred_label'])


def run_api(task: str, config: str, ckpt: str, image: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return dict(det=det_api, seg=seg_api, cls=cls_api)[task](config, ckpt, image, **kwargs)


# ---------------------------------------------------------------- comparisons
def _tol(b: torch.Tensor) -> float:
    return ATOL + RTOL * float(b.abs().max())


def _clear(sorted_desc: torch.Tensor, d: float) -> torch.Tensor:
    """Entries of a descending vector whose gaps to both neighbours exceed ``2 * d``: a
    perturbation of at most ``d`` per value cannot reorder them."""
    gaps = sorted_desc[:-1] - sorted_desc[1:] > 2 * d
    yes = torch.tensor([True])
    return torch.cat([gaps, yes]) & torch.cat([yes, gaps])


def compare_det(a: dict, b: dict) -> None:
    """Same detections: sorted scores within tolerance (robust to near-tie reordering); labels
    and boxes (1e-3 px) equal, rank by rank, for every score that is not a near-tie."""
    assert len(a['scores']) == len(b['scores']) > 0
    sa, ia = a['scores'].sort(descending=True, stable=True)
    sb, ib = b['scores'].sort(descending=True, stable=True)
    d = float((sa - sb).abs().max())
    assert d <= _tol(sb), d
    clear = _clear(sb, d)
    assert clear.sum() > 0
    assert torch.equal(a['labels'][ia][clear], b['labels'][ib][clear])
    torch.testing.assert_close(a['bboxes'][ia][clear], b['bboxes'][ib][clear], atol=1e-3, rtol=0)


def compare_seg(a: dict, b: dict) -> None:
    """Same logits within tolerance; same label wherever the top-2 margin is not a near-tie."""
    d = float((a['logits'] - b['logits']).abs().max())
    assert d <= _tol(b['logits']), d
    top2 = b['logits'].topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * d
    assert clear.float().mean() > 0.5
    assert torch.equal(a['labels'][0][clear], b['labels'][0][clear])


def compare_cls(a: dict, b: dict) -> None:
    """Same class scores within tolerance; same class unless the top-2 are a near-tie."""
    d = float((a['scores'] - b['scores']).abs().max())
    assert d <= _tol(b['scores']), d
    top2 = b['scores'].topk(2).values
    if top2[0] - top2[1] > 2 * d:
        assert a['label'] == b['label']


COMPARE = dict(det=compare_det, seg=compare_seg, cls=compare_cls)


def n_refconv(model: nn.Module) -> int:
    return sum(isinstance(m, RefConv2d) for m in model.modules())


def assert_loaded(model: nn.Module, ckpt: str) -> None:
    """Every checkpoint entry is in the model, unchanged, and nothing is missing: the APIs load
    non-strictly, so check it here."""
    sd = load_checkpoint_file(ckpt)['state_dict']
    have = model.state_dict()
    assert set(have) == set(sd)
    for k, v in sd.items():
        assert torch.equal(have[k], v), k


def _det_kwargs(task: str, route: str) -> dict:
    # The workaround until init_detector reads config.model.backbone only when it exists.
    return dict(cfg_options={}) if task == 'det' and route == 'RefConvModel' else {}


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('task', TASKS)
def test_merged_original_config_equals_refocused(runs, task, route):
    """The API's predictions: merged checkpoint + ORIGINAL config == refocused checkpoint + its
    RefConv config; both models hold exactly their checkpoint's weights."""
    r = runs[task]
    ref_model, ref_out = run_api(task, r[route]['config'], r[route]['ref'], r['image'],
                                 **_det_kwargs(task, route))
    plain_model, plain_out = run_api(task, r['baseline'], r[route]['merged'], r['image'])
    n_layers = len(refconv_prefixes(load_checkpoint_file(r[route]['ref'])['state_dict']))
    assert n_refconv(ref_model) == n_layers > 0
    assert n_refconv(plain_model) == 0
    assert type(ref_model) is type(plain_model)  # RefConvModel builds the original class
    assert_loaded(ref_model, r[route]['ref'])
    assert_loaded(plain_model, r[route]['merged'])
    COMPARE[task](plain_out, ref_out)
    # raw outputs of the two API-built models on the same random input
    size = (CLS_SIZE, CLS_SIZE) if task == 'cls' else (64, 64)
    diff, scale = max_output_diff(ref_model, plain_model, size=size)
    assert diff <= ATOL + RTOL * scale, (diff, scale)


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('task', TASKS)
def test_refocused_kernels_differ_from_baseline(runs, task, route):
    """The equalities above are not vacuous: the refocused checkpoints hold the baseline's bases
    bit for bit, and every merged kernel differs from its basis (relative change > 1e-3)."""
    r = runs[task]
    base = load_checkpoint_file(r['base'])['state_dict']
    ref = load_checkpoint_file(r[route]['ref'])['state_dict']
    merged = load_checkpoint_file(r[route]['merged'])['state_dict']
    assert set(merged) == set(base)
    prefixes = refconv_prefixes(ref)
    assert prefixes
    for p in prefixes:
        w = base[p + 'weight']
        assert torch.equal(ref[p + 'weight'], w), p
        assert float((merged[p + 'weight'] - w).norm() / w.norm()) > 1e-3, p


def test_init_detector_needs_cfg_options_for_refconv_model_config(runs):
    """mmdet 3.3.0's init_detector reads ``config.model.backbone`` when ``cfg_options`` is None;
    a RefConvModel config keeps it at ``model.model.backbone``. docs/user_guide.md documents the workaround
    (any ``cfg_options``, even ``{}``), which the tests above use; this pins the upstream line."""
    from mmdet.apis import init_detector
    r = runs['det']
    with warnings.catch_warnings(), pytest.raises(AttributeError, match="'backbone'"):
        warnings.simplefilter('ignore')
        init_detector(r['RefConvModel']['config'], r['RefConvModel']['ref'], device='cpu')
