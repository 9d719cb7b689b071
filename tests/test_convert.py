"""Whole-model conversion (convert_to_refconv) and back (merge_refconv, merge_state_dict) on real
mmdet and mmseg models built from the installed packages' configs."""
import copy
import fnmatch
import os.path as osp
import re
from typing import Any, Tuple

import pytest
import torch
import torch.nn as nn
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.utils import get_installed_path

import refconv_mm
from refconv_mm import (RefConv2d, RefConv2dAdaptivePadding, convert_to_refconv, merge_refconv,
                        merge_state_dict)
from refconv_mm.config import plain_config
from refconv_mm.refconv import RefConvWS2d
from refconv_mm.verify import build_model, flat_outputs, max_output_diff, random_batch

ZERO_RTOL = 1e-6  # zero init: bitwise equality expected; allow 1e-6 * max(1, output scale)
# Merged vs RefConv: atol * min(1, scale) + rtol * scale (the atol shrinks with outputs below 1:
# a freshly initialised DeepLabV3+ outputs ~3e-4), and at most 1/100 of what refocusing moved.
MERGE_ATOL, MERGE_RTOL = 1e-5, 1e-5
REFOCUS_SCALE = 0.01  # random refocusing moves each kernel by about 1% of itself

# The 2-D convs (all converted) of each model as mmdet 3.3.0 / mmseg 1.2.2 build it.
N_CONVS = dict(retinanet=71, faster_rcnn=64, mask_rcnn=69, fcos=72, pspnet=63, deeplabv3plus=72,
               lraspp=70, segformer=40)
# name -> (installed config, input size, convs that ignore conv_cfg and must be converted)
CASES = {
    'retinanet': ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 64, [
        'bbox_head.retina_cls', 'bbox_head.retina_reg', 'bbox_head.cls_convs.0.conv',
        'backbone.conv1', 'neck.fpn_convs.4.conv']),
    'faster_rcnn': ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 64, [
        'rpn_head.rpn_conv', 'rpn_head.rpn_cls', 'rpn_head.rpn_reg',
        'backbone.layer1.0.downsample.0']),
    'mask_rcnn': ('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 64, [
        'rpn_head.rpn_conv', 'rpn_head.rpn_cls', 'roi_head.mask_head.conv_logits',
        'roi_head.mask_head.convs.3.conv']),
    'fcos': ('mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py', 64, [
        'bbox_head.conv_cls', 'bbox_head.conv_reg', 'bbox_head.conv_centerness']),
    'pspnet': ('mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', 64, [
        'decode_head.conv_seg', 'auxiliary_head.conv_seg', 'decode_head.bottleneck.conv',
        'decode_head.psp_modules.0.1.conv', 'backbone.stem.0']),
    'deeplabv3plus': ('mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py',
                      64, ['decode_head.conv_seg', 'decode_head.aspp_modules.1.depthwise_conv.conv',
                           'decode_head.aspp_modules.1.pointwise_conv.conv',
                           'decode_head.sep_bottleneck.0.depthwise_conv.conv',
                           'decode_head.sep_bottleneck.1.pointwise_conv.conv',
                           'decode_head.c1_bottleneck.conv']),
    # LRASPP's image pool is a 49x49 average pool over the 1/8 map: the input needs >= 392.
    'lraspp': ('mmseg::mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-512x1024.py', 416, [
        'decode_head.convs.conv0', 'decode_head.convs.conv1', 'decode_head.conv_up_input',
        'decode_head.conv_seg', 'decode_head.aspp_conv.conv', 'decode_head.image_pool.1.conv',
        'backbone.layer0.conv', 'backbone.layer2.depthwise_conv.conv']),
    'segformer': ('mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py', 64, [
        'decode_head.convs.0.conv', 'decode_head.fusion_conv.conv', 'decode_head.conv_seg',
        'backbone.layers.0.0.projection', 'backbone.layers.3.0.projection',
        'backbone.layers.0.1.0.attn.sr', 'backbone.layers.0.1.0.ffn.layers.1']),
}


def no_pretrained(node: Any) -> Any:
    """``node`` with every ``init_cfg`` and ``pretrained`` removed, so nothing downloads."""
    if isinstance(node, dict):
        return {k: (None if k in ('init_cfg', 'pretrained') else no_pretrained(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [no_pretrained(v) for v in node]
    return node


def installed_config(spec: str) -> str:
    """Path of ``'pkg::rel/path.py'`` inside the installed package's ``.mim/configs``."""
    package, rel = spec.split('::')
    return osp.join(get_installed_path(package), '.mim', 'configs', rel)


def load_cfg(name: str) -> Config:
    """The case's installed config, offline (no pretrained weights) and with few proposals."""
    cfg = Config.fromfile(installed_config(CASES[name][0]))
    cfg.model = no_pretrained(cfg.model.to_dict())
    rpn = cfg.model.get('test_cfg', {}).get('rpn')
    if rpn:  # 20 proposals, not 1000: the RoI heads run on each in 'tensor' mode
        rpn.update(nms_pre=100, max_per_img=20)
    return cfg


def convs(model: nn.Module, cls: type = nn.Conv2d) -> dict:
    """``{name: module}`` of every module of class ``cls`` (subclasses included)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def randomize_refocus(model: nn.Module, seed: int = 0) -> None:
    """Seeded small random refocusing weights in every RefConv (about REFOCUS_SCALE each)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConv2d):
                w = m.refocus_weight
                std = REFOCUS_SCALE / (w.shape[1] * w.shape[2] * w.shape[3]) ** 0.5
                w.copy_(torch.randn(w.shape, generator=g).mul_(std))


@torch.no_grad()
def outputs(model: nn.Module, size: Tuple[int, int]) -> list:
    """The raw ('tensor' mode) outputs of ``model`` (eval) on verify's seeded random batch."""
    x, samples = random_batch(model.eval(), size)
    return flat_outputs(model(x, samples, mode='tensor'))


def output_diff(a: list, b: list) -> tuple:
    """``(max |a - b|, max |b|)``; ``inf`` if the outputs' number or shapes differ."""
    scale = max(t.abs().max().item() for t in b)
    if len(a) != len(b) or any(ta.shape != tb.shape for ta, tb in zip(a, b)):
        return float('inf'), scale
    return max((ta - tb).abs().max().item() for ta, tb in zip(a, b)), scale


class Pair:
    """A plain model built from an installed config and its whole-model RefConv conversion."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cfg = load_cfg(name)
        self.size = (CASES[name][1], CASES[name][1])
        self.expected = CASES[name][2]
        self.plain = build_model(self.cfg)
        # mmdet/mmseg's own init (no checkpoint): outputs that depend on every layer, where
        # torch's default init leaves e.g. DeepLabV3+'s logits dominated by conv_seg's bias.
        self.plain.init_weights()
        self.ref = convert_to_refconv(copy.deepcopy(self.plain))
        self.plain_out = outputs(self.plain, self.size)


@pytest.fixture(scope='module', params=list(CASES))
def pair(request: pytest.FixtureRequest) -> Pair:
    return Pair(request.param)


# -- whole-model conversion on real models --------------------------------------------------
def test_every_conv_converted(pair):
    plain_convs, ref_convs = convs(pair.plain), convs(pair.ref)
    assert len(plain_convs) == N_CONVS[pair.name]
    assert len(convs(pair.ref, RefConv2d)) == N_CONVS[pair.name]
    assert not convs(pair.plain, RefConv2d)
    # Same conv names, each now a RefConv (one per plain Conv2d, shared ones shared).
    assert set(ref_convs) == set(plain_convs)
    assert all(isinstance(m, RefConv2d) for m in ref_convs.values()), \
        [n for n, m in ref_convs.items() if not isinstance(m, RefConv2d)]
    assert len(set(map(id, ref_convs.values()))) == len(set(map(id, plain_convs.values())))
    for name in pair.expected:
        assert isinstance(pair.ref.get_submodule(name), RefConv2d), name
        assert type(pair.plain.get_submodule(name)) is not RefConv2d, name
    # Geometry and basis are the plain conv's.
    for name, p in plain_convs.items():
        r = ref_convs[name]
        for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                     'dilation', 'groups', 'padding_mode'):
            assert getattr(r, attr) == getattr(p, attr), (name, attr)
        assert torch.equal(r.weight, p.weight), name
        assert (r.bias is None) == (p.bias is None), name
        assert not r.weight.requires_grad, name  # the basis is frozen
    # Transposed convs (Mask R-CNN's mask upsample) are left alone.
    plain_t = convs(pair.plain, nn.ConvTranspose2d)
    assert set(convs(pair.ref, nn.ConvTranspose2d)) == set(plain_t)
    if pair.name == 'mask_rcnn':
        assert 'roi_head.mask_head.upsample' in plain_t
        assert type(pair.ref.roi_head.mask_head.upsample) is \
            type(pair.plain.roi_head.mask_head.upsample)


def test_adaptive_padding_convs(pair):
    plain_ap = convs(pair.plain, Conv2dAdaptivePadding)
    if pair.name != 'lraspp':
        assert not plain_ap
        return
    # mmseg's MobileNetV3: the stem and the stride-2 depthwise convs (by build-time stride).
    assert {'backbone.layer0.conv', 'backbone.layer2.depthwise_conv.conv',
            'backbone.layer4.depthwise_conv.conv', 'backbone.layer7.depthwise_conv.conv',
            'backbone.layer13.depthwise_conv.conv'} <= set(plain_ap)
    for name in plain_ap:
        assert type(pair.ref.get_submodule(name)) is RefConv2dAdaptivePadding, name
    others = set(convs(pair.ref)) - set(plain_ap)
    assert all(type(pair.ref.get_submodule(n)) is RefConv2d for n in others)
    merged = merge_refconv(copy.deepcopy(pair.ref))
    for name in plain_ap:
        assert type(merged.get_submodule(name)) is Conv2dAdaptivePadding, name


def test_zero_init_same_outputs(pair):
    diff, scale = max_output_diff(pair.ref, pair.plain, size=pair.size)
    assert scale > 0
    assert diff <= ZERO_RTOL * max(1.0, scale), (diff, scale)


def test_merge_randomized(pair):
    ref = copy.deepcopy(pair.ref)
    randomize_refocus(ref)
    ref_out = outputs(ref, pair.size)
    scale = max(t.abs().max().item() for t in ref_out)
    # The refocusing must move the function, else merging it would prove nothing (a two-stage
    # detector may even return another number of RoIs: 'moved' is then inf). Each merged
    # output must be within tol of the RefConv model's and 100x closer than the plain model's.
    moved, _ = output_diff(ref_out, pair.plain_out)
    assert moved > 0
    tol = min(MERGE_ATOL * min(1.0, scale) + MERGE_RTOL * scale, moved / 100)
    plain_sd = pair.plain.state_dict()
    sd_route = merge_state_dict(ref.state_dict())
    # merge_refconv (in place): the original classes, keys and shapes; the same outputs.
    merged = merge_refconv(ref)
    assert not convs(merged, RefConv2d)
    assert {n: type(m) for n, m in convs(merged).items()} == \
        {n: type(m) for n, m in convs(pair.plain).items()}
    merged_sd = merged.state_dict()
    assert list(merged_sd) == list(plain_sd)
    assert all(merged_sd[k].shape == v.shape for k, v in plain_sd.items())
    # Every kernel holds its refocused form: about REFOCUS_SCALE away from the basis.
    for name, conv in convs(pair.plain).items():
        change = (merged_sd[name + '.weight'] - conv.weight).norm() / conv.weight.norm()
        assert 0.1 * REFOCUS_SCALE < change < 10 * REFOCUS_SCALE, (name, change.item())
    diff, _ = output_diff(outputs(merged, pair.size), ref_out)
    assert diff <= tol, (diff, scale, moved)
    # Both routes load strictly into a freshly built plain model and give the same outputs.
    fresh = build_model(pair.cfg)
    fresh.load_state_dict(merged_sd, strict=True)
    diff, _ = output_diff(outputs(fresh, pair.size), ref_out)
    assert diff <= tol, (diff, scale, moved)
    assert list(sd_route) == list(plain_sd)
    # Bitwise: both routes fold the same refocusing into the same basis.
    assert all(torch.equal(sd_route[k], v) for k, v in merged_sd.items())
    fresh.load_state_dict(sd_route, strict=True)
    diff, _ = output_diff(outputs(fresh, pair.size), ref_out)
    assert diff <= tol, (diff, scale, moved)


def test_frozen_stages_keep_refocus_frozen(pair):
    frozen = pair.cfg.model['backbone'].get('frozen_stages', -1)
    plain_grads = {n: m.weight.requires_grad for n, m in convs(pair.plain).items()}
    # Conversion itself freezes what the model froze (mmdet's ResNet froze it when built) ...
    assert {n: m.refocus_weight.requires_grad
            for n, m in convs(pair.ref, RefConv2d).items()} == plain_grads
    # ... and model.train(), where mmdet's ResNet re-freezes its frozen stages, agrees.
    try:
        pair.ref.train()
        pair.plain.train()
        grads = {n: m.refocus_weight.requires_grad for n, m in convs(pair.ref, RefConv2d).items()}
        assert grads == {n: m.weight.requires_grad for n, m in convs(pair.plain).items()}
    finally:
        pair.ref.eval()
        pair.plain.eval()
    if pair.name in ('retinanet', 'faster_rcnn', 'mask_rcnn', 'fcos'):
        assert frozen == 1
        frozen_names = {n for n, g in grads.items() if not g}
        assert frozen_names == {n for n in grads if re.match(r'backbone\.(conv1|layer1\.)', n)}
        assert 'backbone.conv1' in frozen_names and 'backbone.layer1.0.conv2' in frozen_names
        assert grads['backbone.layer2.0.conv2'] and grads['neck.fpn_convs.0.conv']
    else:
        assert frozen == -1 and all(grads.values())
    if pair.name == 'retinanet':  # merging keeps them: frozen plain weights stay frozen
        merged = merge_refconv(copy.deepcopy(pair.ref))
        assert {n: m.weight.requires_grad for n, m in convs(merged).items()} == plain_grads


# -- include / exclude / spatial_only ---------------------------------------------------------
@pytest.mark.parametrize('pair', ['pspnet'], indirect=True)
def test_include_backbone_only(pair):
    model = convert_to_refconv(copy.deepcopy(pair.plain), include='backbone')
    for name, m in convs(model).items():
        assert isinstance(m, RefConv2d) == name.startswith('backbone.'), name
    assert type(model.decode_head.conv_seg) is nn.Conv2d


@pytest.mark.parametrize('pair', ['pspnet'], indirect=True)
def test_exclude_glob_keeps_conv_seg_plain(pair):
    model = convert_to_refconv(copy.deepcopy(pair.plain), exclude=['*.conv_seg'])
    plain_names = {n for n, m in convs(model).items() if not isinstance(m, RefConv2d)}
    assert plain_names == {'decode_head.conv_seg', 'auxiliary_head.conv_seg'}


@pytest.mark.parametrize('pair', ['pspnet'], indirect=True)
def test_include_then_exclude_with_globs(pair):
    # A pattern selects the module and its descendants; exclude applies after include.
    model = convert_to_refconv(copy.deepcopy(pair.plain),
                               include=['backbone.layer[12]', 'decode_head'],
                               exclude='decode_head.psp_modules.*')
    for name, m in convs(model).items():
        want = (fnmatch.fnmatchcase(name, 'backbone.layer[12].*')
                or (name.startswith('decode_head.')
                    and not name.startswith('decode_head.psp_modules.')))
        assert isinstance(m, RefConv2d) == want, name
    assert isinstance(model.decode_head.conv_seg, RefConv2d)


@pytest.mark.parametrize('pair', ['lraspp'], indirect=True)
def test_spatial_only_keeps_1x1_plain(pair):
    model = convert_to_refconv(copy.deepcopy(pair.plain), spatial_only=True, map_k=1)
    n_spatial = 0
    for name, m in convs(model).items():
        is_1x1 = m.kernel_size == (1, 1)
        assert isinstance(m, RefConv2d) != is_1x1, name
        if not is_1x1:
            n_spatial += 1
            assert m.refocus_weight.shape[2:] == (1, 1), name  # map_k reached the layer
    assert n_spatial > 10 and isinstance(model.backbone.layer0.conv, RefConv2dAdaptivePadding)
    assert type(model.decode_head.conv_seg) is nn.Conv2d
    diff, scale = max_output_diff(model, pair.plain, size=pair.size)
    assert diff <= ZERO_RTOL * max(1.0, scale), (diff, scale)


@pytest.mark.parametrize('pair', ['lraspp'], indirect=True)
def test_refconv_model_config_form(pair):
    """The config form builds the same conversion; plain_config gives the original back."""
    cfg = copy.deepcopy(pair.cfg)
    cfg.model = dict(type='RefConvModel', model=cfg.model, exclude=['*.conv_seg'], map_k=1)
    model = build_model(cfg)
    want = convert_to_refconv(copy.deepcopy(pair.plain), exclude=['*.conv_seg'], map_k=1)
    assert type(model) is type(pair.plain)
    assert {n: type(m) for n, m in convs(model).items()} == \
        {n: type(m) for n, m in convs(want).items()}
    assert type(model.decode_head.conv_seg) is nn.Conv2d
    assert all(m.refocus_weight.shape[2:] == (1, 1) for m in convs(model, RefConv2d).values())
    assert list(model.state_dict()) == list(want.state_dict())
    assert plain_config(cfg).model == pair.cfg.model


# -- bad input ----------------------------------------------------------------------------------
def _one_line(exc_info: pytest.ExceptionInfo) -> str:
    """The exception's message, asserted to be one line."""
    msg = str(exc_info.value)
    assert '\n' not in msg
    return msg


def test_no_conv_is_an_error():
    with pytest.raises(ValueError, match='no 2-D conv to convert') as e:
        convert_to_refconv(nn.Sequential(nn.Linear(2, 2)))
    assert 'has no nn.Conv2d' in _one_line(e)


def test_selection_with_nothing_to_convert():
    with pytest.raises(ValueError, match=r'no 2-D conv to convert \(.*spatial_only=True\)'):
        convert_to_refconv(nn.Sequential(nn.Conv2d(3, 4, 1)), spatial_only=True)


@pytest.mark.parametrize('pair', ['retinanet'], indirect=True)
@pytest.mark.parametrize('kwargs,text', [
    (dict(include='head'), "include=['head'] matches no module"),
    (dict(include='backbone', exclude=['neck.nope', 'bbox_head']),
     "exclude=['neck.nope'] matches no module"),
])
def test_patterns_that_match_nothing(pair, kwargs, text):
    model = copy.deepcopy(pair.plain)
    with pytest.raises(ValueError) as e:
        convert_to_refconv(model, **kwargs)
    msg = _one_line(e)
    assert text in msg and 'backbone' in msg  # names the model's top-level modules
    assert not convs(model, RefConv2d)  # nothing converted


def test_unsupported_subclass_is_refused_by_name_and_class():
    # mmcv's ConvAWS2d (DetectoRS) standardises its weight with learned buffers: not reproduced.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(ConvAWS2d(4, 4, 3)))
    with pytest.raises(ValueError) as e:
        convert_to_refconv(model)
    msg = _one_line(e)
    assert '1 conv(s)' in msg and '1.0 (mmcv.cnn.bricks.conv_ws.ConvAWS2d)' in msg
    assert 'exclude=' in msg
    assert type(model[0]) is nn.Conv2d  # refused as a whole: nothing half converted
    convert_to_refconv(model, exclude='1')
    assert type(model[0]) is RefConv2d and type(model[1][0]) is ConvAWS2d
    with pytest.raises(ValueError, match=r'<the model itself> \(.*ConvAWS2d\)'):
        convert_to_refconv(ConvAWS2d(4, 4, 3))


def test_weight_standardised_conv_round_trip():
    """mmcv's ConvWS2d (gn+ws configs) is supported: RefConvWS2d, merged back to ConvWS2d."""
    torch.manual_seed(0)
    plain = nn.Sequential(ConvWS2d(3, 8, 3, padding=1, eps=1e-4), nn.ReLU(),
                          ConvWS2d(8, 4, 1, bias=False)).eval()
    ref = convert_to_refconv(copy.deepcopy(plain))
    assert [type(m) for m in ref[::2]] == [RefConvWS2d, RefConvWS2d] and ref[0].eps == 1e-4
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = plain(x)
        assert torch.equal(ref(x), want)  # zero init: the same kernel, standardised alike
        randomize_refocus(ref)
        got = ref(x)
        merged = merge_refconv(copy.deepcopy(ref))
        assert [type(m) for m in merged[::2]] == [ConvWS2d, ConvWS2d] and merged[0].eps == 1e-4
        scale = got.abs().max().item()
        assert (got - want).abs().max() > 1e-4 * scale  # refocusing moved the output
        torch.testing.assert_close(merged(x), got, atol=MERGE_ATOL * scale, rtol=MERGE_RTOL)
    assert list(merged.state_dict()) == list(plain.state_dict())


def test_refconv_model_without_model():
    with pytest.raises(Exception, match=r"RefConvModel: 'model' must be the original model dict"):
        MODELS.build(dict(type='RefConvModel'))


def test_even_map_k_is_refused():
    with pytest.raises(ValueError, match='map_k=2 must be a positive odd integer'):
        convert_to_refconv(nn.Sequential(nn.Conv2d(3, 4, 3)), map_k=2)


# -- what the model was stays as it was -------------------------------------------------------
@pytest.mark.parametrize('pair', ['segformer'], indirect=True)
def test_dtype_device_and_training_flags_kept(pair):
    plain = copy.deepcopy(pair.plain).double()
    plain.train()
    plain.backbone.eval()  # mixed flags: the backbone in eval, the head training
    model = copy.deepcopy(plain)
    flags = {n: m.training for n, m in convs(model).items()}
    convert_to_refconv(model)
    assert model.training and not model.backbone.training
    for name, m in convs(model, RefConv2d).items():
        assert m.training == flags[name], name
        for p in (m.weight, m.refocus_weight, m.bias):
            if p is not None:
                assert p.dtype == torch.float64 and p.device == torch.device('cpu'), name
    assert any(flags.values()) and not all(flags.values())
    plain.eval()
    model.eval()
    x, samples = random_batch(model, pair.size)
    with torch.no_grad():
        a = flat_outputs(model(x.double(), samples, mode='tensor'))
        b = flat_outputs(plain(x.double(), samples, mode='tensor'))
    assert a and all(t.dtype == torch.float64 for t in a)
    scale = max(t.abs().max().item() for t in b)
    diff = max((ta - tb).abs().max().item() for ta, tb in zip(a, b))
    assert diff <= ZERO_RTOL * max(1.0, scale), (diff, scale)


def test_single_conv_and_shared_conv():
    conv = refconv_mm.convert_to_refconv(nn.Conv2d(3, 4, 3, bias=False).double().eval())
    assert type(conv) is RefConv2d and conv.refocus_weight.dtype == torch.float64
    assert conv.bias is None and not conv.training
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.ModuleDict(dict(a=nn.Sequential(shared), b=nn.Sequential(shared)))
    convert_to_refconv(model)
    assert model['a'][0] is model['b'][0] and isinstance(model['a'][0], RefConv2d)
    merge_refconv(model)  # and back: still one conv (RetinaSepBNHead shares convs so)
    assert model['a'][0] is model['b'][0] and type(model['a'][0]) is nn.Conv2d
