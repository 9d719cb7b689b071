"""refconv_mm: RefConv (Re-parameterized Refocusing Convolution) for OpenMMLab 2.x.

``import refconv_mm`` registers the ``RefConv`` conv type and ``RefConvModel``
(mmengine root ``MODELS``, so mmdet, mmseg and mmpretrain scopes all find them) and
``RefConvHook`` (root ``HOOKS``), and lets mmengine load its own checkpoints under
torch's weights-only loading. It first checks that torch, mmcv and mmengine are in the supported
range (``compat``).

The core: ``refocus`` (the math), ``refconv`` (the layer), ``convert`` / ``merge``
(plain -> RefConv and back), ``hook``, ``checkpoint``, ``config``, ``dist``, ``verify``.
``refconv_mm.experiments`` holds what the demo, benchmarks and tests run on.
"""
from .compat import check_environment

# first: outside the supported range, one sentence beats a traceback from deep inside mmcv
check_environment()

from .checkpoint import allow_mmengine_checkpoints  # noqa: E402
from .convert import RefConvModel, convert_to_refconv  # noqa: E402
from .dist import DeviceAgnosticDDP  # noqa: E402
from .hook import RefConvHook  # noqa: E402
from .merge import merge_refconv, merge_state_dict  # noqa: E402
from .refconv import (RefConv2d, RefConv2dAdaptivePadding, RefConvWS2d,  # noqa: E402
                      build_refconv)
from .refocus import refocus_kernel, refocused_conv2d  # noqa: E402
from .version import __version__  # noqa: E402

allow_mmengine_checkpoints()

__all__ = [
    'RefConv2d', 'RefConv2dAdaptivePadding', 'RefConvWS2d', 'build_refconv', 'convert_to_refconv',
    'RefConvModel', 'RefConvHook', 'DeviceAgnosticDDP', 'refocus_kernel', 'refocused_conv2d',
    'merge_refconv', 'merge_state_dict', 'allow_mmengine_checkpoints', '__version__'
]
