"""MobileNetV3 sized for 32x32 digits: mmpretrain's MobileNetV3 with one more ``arch``.

``MobileNetV3Digits(arch='digits')`` is mmpretrain's ``MobileNetV3`` (its stem, its
``InvertedResidual`` blocks with regular, depthwise, 1x1 and squeeze-excitation convs, its
last 1x1 conv) with six blocks and three stride-2 steps instead of eleven blocks and five,
so a 32x32 digit ends as a 4x4 map instead of 1x1. The other archs work as in mmpretrain.
Importing this module registers it in mmpretrain's model registry.
"""
from mmpretrain.models.backbones import MobileNetV3
from mmpretrain.registry import MODELS

__all__ = ['MobileNetV3Digits']


@MODELS.register_module()
class MobileNetV3Digits(MobileNetV3):
    """mmpretrain ``MobileNetV3`` plus ``arch='digits'`` (85k parameters, stride 8)."""

    # [kernel, mid channels, out channels, with SE, act, stride], as MobileNetV3's archs.
    arch_settings = dict(MobileNetV3.arch_settings, digits=[
        [3, 16, 16, True, 'ReLU', 1],
        [3, 48, 24, False, 'ReLU', 2],
        [3, 72, 24, False, 'ReLU', 1],
        [5, 96, 40, True, 'HSwish', 2],
        [5, 144, 40, True, 'HSwish', 1],
        [5, 144, 48, True, 'HSwish', 1],
    ])  # yapf: disable
