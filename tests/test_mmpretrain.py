"""RefConv in mmpretrain: real models from the installed and the plugin's configs, both routes
(``conv_cfg`` and the whole-model ``RefConvModel`` / ``convert_to_refconv``), and the whole
workflow through the tools on generated shape images (baseline -> refocus -> merge -> test,
and ``mim train mmpretrain``).

The ResNet-18 shapes classifier trained here (:func:`trained_classifier`) is built once per
pytest session and shared with ``test_transfer.py`` and ``test_inference_apis.py``.
"""
import copy
import json
import os.path as osp
import shutil
from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hub import get_config

from refconv_mm import RefConv2d, convert_to_refconv, merge_refconv, merge_state_dict
from refconv_mm.checkpoint import load_checkpoint_file
from refconv_mm.config import plain_config
from refconv_mm.experiments.runlogs import logged_metrics
from refconv_mm.experiments.shapes_configs import write_config_pair
from refconv_mm.experiments.shapes_data import CLASSES, make_classification_set
from refconv_mm.merge import refconv_prefixes
from refconv_mm.verify import build_model

from .conftest import CONFIGS, MIM, run_tool

MBV3 = 'mmpretrain::mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py'
MBV2 = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
R50 = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
PLUGIN = osp.join(CONFIGS, 'mmpretrain')

# Shapes classifier: ResNet-18 (mmpretrain::resnet/resnet18_8xb32_in1k.py) on 32x32 images;
# checkpoints every 3 iterations (iter_3 and iter_6 kept: refocus training moves the weights).
CLS_SIZE, CLS_ITERS, CLS_CKPT = 32, 6, 3
# init='official' (documented RefConv option): the kernels move visibly from step 0, so the
# merged == refocused checks below are real (6 zero-init iterations stay within fp32 rounding).
CLS_REFCONV = dict(type='RefConv', init='official')
# ResNet-18: the 7x7 stem, 2 convs in each of 8 basic blocks, 3 downsample convs.
R18_REFCONV_LAYERS = 1 + 16 + 3
# Merged vs refocused outputs: the tolerance tools/merge_refconv.py --verify uses.
ATOL, RTOL = 1e-5, 1e-5
SIZE = 32  # input side for the real-model comparisons (cheap; every stage still runs)


def _count(model: nn.Module, cls=RefConv2d) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def randomize_refocus(model: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Give every RefConv a seeded random refocusing transform (as if refocus-trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConv2d):
                m.refocus_weight.copy_(torch.randn(m.refocus_weight.shape, generator=g) * scale)


@torch.no_grad()
def calibrate_bn(model: nn.Module, size: int = SIZE, seed: int = 1) -> nn.Module:
    """Set BN running statistics from two random batches, as training would.

    A randomly initialised MobileNetV3 with the default statistics (mean 0, var 1) shrinks
    its features to ~1e-9, so its outputs would not depend on the convs at all.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for _ in range(2):
        model.extract_feat(torch.randn(4, 3, size, size, generator=g))
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """The classifier's raw output ('tensor' mode, eval) on a seeded random batch."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    assert not model.training  # no .eval() here: it would drop RefConv's cached kernels
    return model(x, mode='tensor')


def assert_close_outputs(out: torch.Tensor, expected: torch.Tensor) -> None:
    """|out - expected| <= ATOL + RTOL * max|expected| (merge_refconv.py --verify's rule)."""
    diff, scale = float((out - expected).abs().max()), float(expected.abs().max())
    assert diff <= ATOL + RTOL * scale, (diff, scale)


def trained_classifier(tmp_path_factory) -> Dict[str, str]:
    """The shapes ResNet-18 classifier through the tools, built once per pytest session.

    Generated data (24 train / 12 val images, 32x32) -> ``tools/train.py`` baseline (ORIGINAL
    config) -> ``tools/train.py`` refocus (``conv_cfg`` RefConv config + ``load_from``) ->
    ``tools/merge_refconv.py --verify --out-config`` (RefConv ``init='official'``). Cached
    under the session's base temp dir, so every test module of the session reuses it.

    Returns:
        Paths: ``work``, ``data_root``, ``baseline``/``refconv`` (configs), ``base``/``ref``/
        ``merged`` (checkpoints), ``plain_cfg`` (the written plain config), ``merge_log``.
    """
    work = osp.join(str(tmp_path_factory.getbasetemp()), 'cls_shapes')
    done = osp.join(work, 'done.json')
    if osp.isfile(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(work, ignore_errors=True)  # an earlier, failed attempt of this session
    data = make_classification_set(osp.join(work, 'data'), num_train=24, num_val=12,
                                   size=CLS_SIZE)
    paths = write_config_pair(osp.join(work, 'cfg'), data['data_root'], 'cls', iters=CLS_ITERS,
                              refocus_iters=CLS_ITERS, size=CLS_SIZE, batch=4, log_interval=1,
                              ckpt_interval=CLS_CKPT, refconv=CLS_REFCONV)
    out = dict(work=work, data_root=data['data_root'], **paths,
               base=osp.join(work, 'base', f'iter_{CLS_ITERS}.pth'),
               ref=osp.join(work, 'ref', f'iter_{CLS_ITERS}.pth'),
               merged=osp.join(work, 'merged.pth'), plain_cfg=osp.join(work, 'plain.py'))
    run_tool('tools/train.py', paths['baseline'], '--work-dir', osp.join(work, 'base'))
    run_tool('tools/train.py', paths['refconv'], '--work-dir', osp.join(work, 'ref'),
             '--cfg-options', f"load_from={out['base']}")
    proc = run_tool('tools/merge_refconv.py', paths['refconv'], out['ref'], out['merged'],
                    '--verify', '--out-config', out['plain_cfg'])
    out['merge_log'] = proc.stdout
    with open(done, 'w') as f:
        json.dump(out, f)
    return out


@pytest.fixture(scope='module')
def classifier(tmp_path_factory) -> Dict[str, str]:
    return trained_classifier(tmp_path_factory)


# ---------------------------------------------------------------- real models, both routes
# (arch, route) -> the RefConv model and the plain model (plain_config / ORIGINAL config).
VARIANTS = [('mbv3', 'conv_cfg'), ('mbv3', 'RefConvModel'), ('r50', 'conv_cfg'),
            ('r50', 'convert_to_refconv'), ('mbv2', 'conv_cfg')]
ORIGINAL = dict(mbv3=MBV3, r50=R50, mbv2=MBV2)
REFCONV_CONFIG = {
    ('mbv3', 'conv_cfg'): 'mobilenet-v3-large_refconv_8xb64-cos105e_in1k.py',
    ('mbv3', 'RefConvModel'): 'mobilenet-v3-large_refconv-model_8xb64-cos105e_in1k.py',
    ('r50', 'conv_cfg'): 'resnet50_refconv_8xb32_in1k.py',
}
_BUILT: Dict[Tuple[str, str], tuple] = {}
_ORIGINAL: Dict[str, nn.Module] = {}


def original_model(arch: str) -> nn.Module:
    """A fresh copy of the model of the installed ORIGINAL mmpretrain config (built once)."""
    if arch not in _ORIGINAL:
        _ORIGINAL[arch] = build_model(get_config(ORIGINAL[arch]))
    return copy.deepcopy(_ORIGINAL[arch])


def built(arch: str, route: str) -> Tuple[nn.Module, nn.Module]:
    """``(refconv model, plain model holding the same weights)``, built once per module."""
    key = (arch, route)
    if key not in _BUILT:
        if route == 'convert_to_refconv':
            plain = calibrate_bn(original_model(arch))
            ref = convert_to_refconv(copy.deepcopy(plain))
        else:
            if key in REFCONV_CONFIG:
                cfg = Config.fromfile(osp.join(PLUGIN, REFCONV_CONFIG[key]))
            else:  # an installed config plus the one-line override
                cfg = get_config(ORIGINAL[arch])
                cfg.model.backbone.conv_cfg = dict(type='RefConv')
            ref = build_model(cfg)
            plain = calibrate_bn(build_model(plain_config(cfg)))
            # the plain model's weights (random, calibrated BN) are the "trained" checkpoint
            missing, unexpected = ref.load_state_dict(plain.state_dict(), strict=False)
            assert unexpected == [] and all(k.endswith('.refocus_weight') for k in missing)
            assert len(missing) == _count(ref)
        _BUILT[key] = (ref, plain)
    return _BUILT[key]


@pytest.fixture(scope='module', autouse=True)
def _free_models():
    """Drop the cached models when this module's tests end (several hundred MB)."""
    yield
    _BUILT.clear()
    _ORIGINAL.clear()


def refconv_names(model: nn.Module) -> set:
    return {n for n, m in model.named_modules() if isinstance(m, RefConv2d)}


@pytest.mark.parametrize('route', ['conv_cfg', 'RefConvModel'])
def test_mobilenet_v3_large_official_selection(route):
    """Stem + 15 depthwise convs are RefConv; every 1x1 conv (expand, project, SE, last) is not."""
    ref, plain = built('mbv3', route)
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, RefConv2d)}
    assert len(layers) == 16
    assert 'backbone.layer0.conv' in layers
    assert layers['backbone.layer0.conv'].kernel_size == (3, 3)
    depthwise = [n for n, m in layers.items() if m.groups == m.in_channels == m.out_channels > 1]
    assert len(depthwise) == 15 and all(n.endswith('depthwise_conv.conv') for n in depthwise)
    others = [(n, m) for n, m in ref.named_modules()
              if isinstance(m, nn.Conv2d) and not isinstance(m, RefConv2d)]
    assert others and all(type(m) is nn.Conv2d and m.kernel_size == (1, 1) for _, m in others)
    se = [n for n, _ in others if '.se.' in n]
    assert len(se) == 16  # 8 SE blocks x 2 convs, plain
    assert _count(plain) == 0 and _count(plain, nn.Conv2d) == len(layers) + len(others)


def test_mobilenet_v3_routes_refocus_the_same_layers():
    """The conv_cfg config and the RefConvModel config give the same layers and state dict keys."""
    a, _ = built('mbv3', 'conv_cfg')
    b, _ = built('mbv3', 'RefConvModel')
    assert refconv_names(a) == refconv_names(b)
    assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize('route', ['conv_cfg', 'convert_to_refconv'])
def test_resnet50_every_conv_is_refconv(route):
    ref, plain = built('r50', route)
    assert _count(ref) == 53
    assert _count(ref, nn.Conv2d) == 53  # nothing left plain: the head is linear
    assert _count(plain) == 0 and _count(plain, nn.Conv2d) == 53


def test_resnet50_routes_refocus_the_same_layers():
    a, _ = built('r50', 'conv_cfg')
    b, _ = built('r50', 'convert_to_refconv')
    assert refconv_names(a) == refconv_names(b)
    assert list(a.state_dict()) == list(b.state_dict())


def test_mobilenet_v2_conv_cfg_reaches_every_conv():
    """mmpretrain's MobileNetV2 passes conv_cfg to all its convs, the 17 depthwise ones too."""
    ref, plain = built('mbv2', 'conv_cfg')
    n_plain = _count(plain, nn.Conv2d)
    assert _count(ref) == n_plain == _count(ref, nn.Conv2d) == 52
    dw = [m for m in ref.modules() if isinstance(m, RefConv2d) and m.groups == m.in_channels > 1]
    assert len(dw) == 17


@pytest.mark.parametrize('arch,route', VARIANTS)
def test_zero_init_same_outputs(arch, route):
    """init='zero': the refocused model computes what the plain model computes (|diff| <= 1e-6
    * max|output|; the kernels are bit-identical, so the outputs are too)."""
    ref, plain = built(arch, route)
    assert all(not m.refocus_weight.any() for m in ref.modules() if isinstance(m, RefConv2d))
    out, expected = logits(ref), logits(plain)
    scale = float(expected.abs().max())
    assert scale > 0 and float((out - expected).abs().max()) <= 1e-6 * scale
    # the outputs depend on the input (calibrated BN), so the equality is not vacuous
    assert float((logits(plain, seed=1) - expected).abs().max()) > 1e-2 * scale


@pytest.mark.parametrize('arch,route', VARIANTS)
def test_random_refocus_merge_exact_and_loads_into_original(arch, route):
    """Random refocus -> merged state dict: strict load into the plain_config model and the
    ORIGINAL mmpretrain config's model, same outputs (|diff| <= 1e-5 + 1e-5 * max|out|)."""
    ref0, plain0 = built(arch, route)
    ref, plain, original = copy.deepcopy(ref0), copy.deepcopy(plain0), original_model(arch)
    randomize_refocus(ref)
    expected = logits(ref)
    # the refocus changed the function (the comparisons below could fail)
    assert float((logits(plain0) - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    merged = merge_state_dict(ref.state_dict())
    assert not refconv_prefixes(merged)
    plain.load_state_dict(merged, strict=True)
    original.load_state_dict(merged, strict=True)
    assert_close_outputs(logits(plain), expected)
    assert_close_outputs(logits(original), expected)
    # merging the model in place gives the same plain state dict, bit for bit (same fp32 math)
    in_place = merge_refconv(ref)
    assert _count(in_place) == 0
    sd = in_place.state_dict()
    assert list(sd) == list(merged)
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k


def _model_dict(cfg: Config) -> dict:
    """``cfg.model`` without ``conv_cfg=None`` entries (plain_config writes them back as None)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not (k == 'conv_cfg' and v is None)}
        if isinstance(node, (list, tuple)):
            return type(node)(strip(v) for v in node)
        return node
    model = strip(cfg.model.to_dict())
    model.pop('_scope_', None)  # mmengine.hub.get_config adds it
    return model


@pytest.mark.parametrize('name,plain_name', [
    ('mobilenet-v3-large_refconv_8xb64-cos105e_in1k.py',
     'mobilenet-v3-large_8xb64-cos105e_in1k.py'),
    ('mobilenet-v3-large_refconv-model_8xb64-cos105e_in1k.py',
     'mobilenet-v3-large_8xb64-cos105e_in1k.py'),
    ('resnet50_refconv_8xb32_in1k.py', R50),
])
def test_plain_config_gives_the_original_model(name, plain_name):
    """plain_config() of a plugin RefConv config has the model of the config it inherits."""
    plain = plain_config(Config.fromfile(osp.join(PLUGIN, name)))
    expected = (get_config(plain_name) if '::' in plain_name
                else Config.fromfile(osp.join(PLUGIN, plain_name)))
    assert _model_dict(plain) == _model_dict(expected)
    assert 'custom_imports' not in plain and 'RefConvHook' not in str(plain.get('custom_hooks'))


# ---------------------------------------------------------------- through the tools
def test_cls_refocus_freezes_basis_and_moves_refocus(classifier):
    """tools/train.py refocus: bases bit-identical to the baseline at every checkpoint, all
    20 refocusing weights trained (iter_3 -> iter_6), merged kernels away from the bases."""
    base = load_checkpoint_file(classifier['base'])['state_dict']
    mid = load_checkpoint_file(osp.join(osp.dirname(classifier['ref']), f'iter_{CLS_CKPT}.pth'))
    ref = load_checkpoint_file(classifier['ref'])['state_dict']
    merged = load_checkpoint_file(classifier['merged'])['state_dict']
    prefixes = refconv_prefixes(ref)
    assert len(prefixes) == R18_REFCONV_LAYERS
    for p in prefixes:
        assert torch.equal(ref[p + 'weight'], base[p + 'weight']), p
        assert torch.equal(mid['state_dict'][p + 'weight'], base[p + 'weight']), p
        # mmpretrain's ResNet freezes no stage: every refocusing weight trains
        assert not torch.equal(mid['state_dict'][p + 'refocus_weight'], ref[p + 'refocus_weight'])
        w = base[p + 'weight']
        assert float((merged[p + 'weight'] - w).norm() / w.norm()) > 1e-3, p


def test_cls_merge_then_original_config_same_accuracy(classifier):
    """merge_refconv.py --verify, then tools/test.py: ORIGINAL config + merged checkpoint gives
    the refocused model's accuracy (exactly; 12 images, so one flipped prediction is 8.3%)."""
    c = classifier
    assert 'verify: max |refocused - merged|' in c['merge_log']
    ckpt = load_checkpoint_file(c['merged'])
    assert set(ckpt) == {'meta', 'state_dict'}
    assert ckpt['meta']['refconv_mm']['merged_layers'] == R18_REFCONV_LAYERS
    assert tuple(ckpt['meta']['dataset_meta']['classes']) == CLASSES
    assert not refconv_prefixes(ckpt['state_dict'])
    # the written plain config is the original model and loads the merged weights strictly
    plain_cfg = Config.fromfile(c['plain_cfg'])
    assert 'RefConv' not in str(plain_cfg.model) + str(plain_cfg.get('custom_hooks'))
    assert 'refconv_mm' not in str(plain_cfg.get('custom_imports'))
    build_model(plain_cfg).load_state_dict(ckpt['state_dict'], strict=True)
    # the ORIGINAL config, strict load, the real test loop; the refocused model's accuracy
    # is the validation run at the end of refocus training (the same weights, ref checkpoint)
    work = c['work']
    run_tool('tools/test.py', c['baseline'], c['merged'], '--work-dir',
             osp.join(work, 'test_merged'))
    m_merged = logged_metrics(osp.join(work, 'test_merged'))
    m_ref = logged_metrics(osp.join(work, 'ref'), 'accuracy/top1')
    assert m_merged['accuracy/top1'] == m_ref['accuracy/top1']


def test_mim_train_mmpretrain_with_refconv_config(classifier, tmp_path):
    """`mim train mmpretrain CONFIG --gpus 0` runs mmpretrain's own train.py on a RefConv config."""
    # one refocus iteration, no validation: the run itself is what is tested
    paths = write_config_pair(str(tmp_path), classifier['data_root'], 'cls', iters=1,
                              refocus_iters=1, size=CLS_SIZE, batch=4, val_interval=100,
                              load_from=classifier['base'])
    pytest.importorskip('mim', reason='openmim is not installed')
    out = run_tool(*MIM, 'train', 'mmpretrain', paths['refconv'], '--gpus', '0', '--work-dir',
                   str(tmp_path / 'w'))
    log = out.stdout + out.stderr
    assert f'RefConvHook: {R18_REFCONV_LAYERS} RefConv layers' in log
    sd = load_checkpoint_file(str(tmp_path / 'w' / 'iter_1.pth'))['state_dict']
    base = load_checkpoint_file(classifier['base'])['state_dict']
    prefixes = refconv_prefixes(sd)
    assert len(prefixes) == R18_REFCONV_LAYERS
    for p in prefixes:
        assert torch.equal(sd[p + 'weight'], base[p + 'weight']), p
