"""The pinned stack: torchvision beside torch, and mmdet/mmseg configs that need mmpretrain."""
import torch
import torch.nn as nn
from mmengine.hub import get_config

import refconv_mm
from refconv_mm import RefConv2d
from refconv_mm.verify import build_model, max_output_diff


def test_torchvision_ops_run_beside_torch():
    """The CPU-only torch wheel fails here ('operator torchvision::nms does not exist')."""
    import torchvision
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    assert torch.__version__.startswith('2.13.0') and torchvision.__version__.startswith('0.28.0')


def test_mmdet_convnext_config_imports_mmpretrain():
    """mmdet's ConvNeXt configs import mmpretrain.models through custom_imports."""
    from mmengine.utils import import_modules_from_strings
    cfg = get_config('mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py')
    assert 'mmpretrain.models' in cfg.custom_imports['imports']
    import_modules_from_strings(**cfg.custom_imports)
    assert cfg.model.backbone.type == 'mmpretrain.ConvNeXt'


def test_mmseg_convnext_upernet_builds_and_converts():
    """mmseg's ConvNeXt + UPerNet (backbone from mmpretrain) builds, converts whole, stays exact."""
    cfg = get_config('mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py')
    cfg.model.backbone.init_cfg = None
    # a shallow ConvNeXt-T (one block per stage) keeps the test quick
    cfg.model.backbone.arch = dict(depths=[1, 1, 1, 1], channels=[96, 192, 384, 768])
    plain = build_model(cfg)
    convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    ref = build_model(cfg)
    ref.load_state_dict(plain.state_dict())
    refconv_mm.convert_to_refconv(ref)
    assert sum(isinstance(m, RefConv2d) for m in ref.modules()) == convs
    assert isinstance(ref.backbone.stages[0][0].depthwise_conv, RefConv2d)  # 7x7 depthwise
    diff, scale = max_output_diff(ref, plain, size=(64, 64))
    assert diff <= 1e-6 * max(scale, 1.0), (diff, scale)
