"""Transfer: a classifier refocused and merged in mmpretrain initialises detection and
segmentation backbones through ``init_cfg=dict(type='Pretrained', prefix='backbone.')``.

The merged ResNet-18 checkpoint is the shapes classifier of ``test_mmpretrain.py`` (trained
through the tools, once per session). mmdet's and mmseg's plain ``ResNet`` share mmpretrain's
key layout; mmseg's ``ResNetV1c`` (its FCN/PSPNet default) has a deep stem and does not.
"""
import copy
from typing import Dict

import pytest
import torch
import torch.nn as nn
from mmengine.hub import get_config
from mmengine.registry import MODELS, init_default_scope

from refconv_mm.checkpoint import load_checkpoint_file
from refconv_mm.merge import refconv_prefixes

from .test_mmpretrain import R18_REFCONV_LAYERS, trained_classifier

RETINANET_R18 = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'
FCN_R18 = 'mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py'


@pytest.fixture(scope='module')
def classifier(tmp_path_factory) -> Dict[str, str]:
    return trained_classifier(tmp_path_factory)


def backbone_weights(path: str) -> Dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a checkpoint, prefix removed."""
    sd = load_checkpoint_file(path)['state_dict']
    return {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}


def build_in_scope(model_cfg: dict, scope: str) -> nn.Module:
    init_default_scope(scope)
    return MODELS.build(copy.deepcopy(model_cfg))


def assert_initialised_from(model: nn.Module, merged: Dict[str, torch.Tensor]) -> None:
    """Same key set as the checkpoint's backbone, different weights before init_weights(),
    the merged weights (bit for bit) after it."""
    keys = set(model.backbone.state_dict())
    missing, unexpected = sorted(keys - set(merged)), sorted(set(merged) - keys)
    assert missing == [] and unexpected == [], (missing[:5], unexpected[:5])
    before = model.backbone.state_dict()
    assert not all(torch.equal(before[k], merged[k]) for k in merged if k.endswith('weight'))
    model.init_weights()
    after = model.backbone.state_dict()
    for k, v in merged.items():
        assert torch.equal(after[k], v), k


def test_merged_classifier_is_plain_and_refocused(classifier):
    """What the backbones get: plain keys, refocused kernels (not the pre-refocus bases)."""
    merged = backbone_weights(classifier['merged'])
    ref = load_checkpoint_file(classifier['ref'])['state_dict']
    prefixes = refconv_prefixes(ref)
    assert len(prefixes) == R18_REFCONV_LAYERS and not refconv_prefixes(merged)
    for p in prefixes:
        key = p[len('backbone.'):] + 'weight'
        assert not torch.equal(merged[key], ref[p + 'weight']), key


def test_retinanet_r18_backbone_from_merged_classifier(classifier):
    cfg = get_config(RETINANET_R18)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=classifier['merged'],
                                       prefix='backbone.')
    model = build_in_scope(cfg.model, 'mmdet')
    assert type(model.backbone).__module__.startswith('mmdet')
    assert_initialised_from(model, backbone_weights(classifier['merged']))


def test_fcn_r18_plain_resnet_backbone_from_merged_classifier(classifier):
    """mmseg FCN-R18 with mmseg's plain ``ResNet`` (7x7 stem, as mmpretrain's) instead of the
    config's ``ResNetV1c``; the dilated stages keep the same keys."""
    cfg = get_config(FCN_R18)
    cfg.model.pretrained = None  # else EncoderDecoder writes its own Pretrained init_cfg
    cfg.model.backbone.update(type='ResNet', init_cfg=dict(
        type='Pretrained', checkpoint=classifier['merged'], prefix='backbone.'))
    model = build_in_scope(cfg.model, 'mmseg')
    assert type(model.backbone).__module__.startswith('mmseg')
    assert model.backbone.dilations == (1, 1, 2, 4)
    assert_initialised_from(model, backbone_weights(classifier['merged']))


def test_mmseg_resnetv1c_stem_does_not_match_classifier(classifier):
    """Why the FCN test swaps the backbone type: ResNetV1c's deep stem (three 3x3 convs,
    ``stem.*``) replaces ``conv1``/``bn1``; every stage key matches."""
    cfg = get_config(FCN_R18)
    backbone = build_in_scope(cfg.model.backbone, 'mmseg')
    merged = backbone_weights(classifier['merged'])
    keys = set(backbone.state_dict())
    missing, unexpected = keys - set(merged), set(merged) - keys
    assert missing and all(k.startswith('stem.') for k in missing)
    assert unexpected == {k for k in merged if k.startswith(('conv1.', 'bn1.'))}
