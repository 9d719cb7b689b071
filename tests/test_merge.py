"""Merge: RefConv models and state dicts -> plain ones with the same outputs (real models)."""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

import refconv_mm
from refconv_mm import RefConv2d, merge_refconv, merge_state_dict
from refconv_mm.config import plain_config
from refconv_mm.verify import build_model, max_output_diff

from .conftest import CONFIGS

MODELS = [
    # plugin config, expected RefConv layers (backbone + neck + heads that honour conv_cfg)
    ('mmdet/retinanet_r50_fpn_refconv_1x_coco.py', 53 + 8 + 8),
    ('mmdet/faster-rcnn_r50_fpn_refconv_1x_coco.py', 53 + 8),
    ('mmseg/pspnet_r50-d8_refconv_4xb2-40k_cityscapes-512x1024.py', 55 + 5 + 1),
    ('mmseg/deeplabv3plus_r50-d8_refconv_4xb2-40k_cityscapes-512x1024.py', None),
    ('mmseg/mobilenet-v2-d8_deeplabv3plus_refconv_4xb2-80k_cityscapes-512x1024.py', None),
]


def randomize_refocus(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConv2d):
                m.refocus_weight.copy_(torch.randn(m.refocus_weight.shape, generator=g) * scale)


@pytest.fixture(scope='module', params=MODELS, ids=lambda p: osp.basename(p[0]))
def model_pair(request):
    path, n_layers = request.param
    cfg = Config.fromfile(osp.join(CONFIGS, path))
    ref = build_model(cfg)
    plain = build_model(plain_config(cfg))
    return ref, plain, n_layers


def test_plain_checkpoint_loads_then_merge_is_exact(model_pair):
    ref, plain, n_layers = model_pair
    layers = [m for m in ref.modules() if isinstance(m, RefConv2d)]
    if n_layers is not None:
        assert len(layers) == n_layers
    assert not any(isinstance(m, RefConv2d) for m in plain.modules())
    # A plain checkpoint loads with no missing/unexpected basis keys.
    missing, unexpected = ref.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(
        n + '.refocus_weight' for n, m in ref.named_modules() if isinstance(m, RefConv2d))
    assert all(m.basis_loaded for m in layers)
    randomize_refocus(ref)
    # merge_state_dict: the plain model loads it strictly and computes the same function.
    merged_sd = merge_state_dict(ref.state_dict())
    plain.load_state_dict(merged_sd, strict=True)
    diff, scale = max_output_diff(ref, plain, size=(64, 64))
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale), (diff, scale)
    # merge_refconv: in place, keys equal the plain model's, same outputs.
    merged = merge_refconv(copy.deepcopy(ref))
    assert not any(isinstance(m, RefConv2d) for m in merged.modules())
    assert list(merged.state_dict()) == list(plain.state_dict())
    diff2, _ = max_output_diff(ref, merged, size=(64, 64))
    assert diff2 <= 1e-5 * max(1.0, scale)


def test_merge_state_dict_does_not_modify_input():
    layer = RefConv2d(2, 3, 3, init='official')
    sd = layer.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out = merge_state_dict(sd)
    assert set(out) == {'weight', 'bias'}
    assert all(torch.equal(sd[k], before[k]) for k in before)
    torch.testing.assert_close(out['weight'], layer.refocused_kernel().detach())


def test_merge_state_dict_incomplete():
    with pytest.raises(ValueError, match='without a basis weight'):
        merge_state_dict({'conv.refocus_weight': torch.zeros(4, 1, 3, 3)})


def test_merge_refconv_on_bare_layer_and_training_flag():
    layer = RefConv2d(2, 3, 3, padding=1, padding_mode='reflect', init='official').eval()
    conv = merge_refconv(layer)
    assert type(conv) is nn.Conv2d and not conv.training and conv.padding_mode == 'reflect'
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(conv(x), layer(x))


def test_shared_conv_stays_shared_both_ways():
    """RetinaSepBNHead shares its convs across levels: conversion and merge keep one module."""
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.ModuleDict(dict(a=nn.Sequential(shared, nn.ReLU()), b=nn.Sequential(shared)))
    refconv_mm.convert_to_refconv(model, init='official')
    assert isinstance(model.a[0], RefConv2d) and model.a[0] is model.b[0]
    x = torch.randn(1, 3, 5, 5)
    want = model.b(model.a(x))
    merge_refconv(model)
    assert type(model.a[0]) is nn.Conv2d and model.a[0] is model.b[0]
    torch.testing.assert_close(model.b(model.a(x)), want, atol=1e-6, rtol=1e-5)
