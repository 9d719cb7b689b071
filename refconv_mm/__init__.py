"""refconv_mm: RefConv (Re-parameterized Refocusing Convolution) for MMDetection and MMSegmentation.

``import refconv_mm`` registers ``RefConv`` (mmengine root ``MODELS``) and
``RefConvHook`` (root ``HOOKS``), and lets mmengine load its own checkpoints
under torch's weights-only loading.
"""
from .checkpoint import allow_mmengine_checkpoints
from .dist import DeviceAgnosticDDP
from .hook import RefConvHook
from .merge import merge_refconv, merge_state_dict
from .refconv import RefConv2d
from .refocus import refocus_kernel, refocused_conv2d
from .version import __version__

allow_mmengine_checkpoints()

__all__ = [
    'RefConv2d', 'RefConvHook', 'DeviceAgnosticDDP', 'refocus_kernel', 'refocused_conv2d',
    'merge_refconv', 'merge_state_dict', 'allow_mmengine_checkpoints', '__version__'
]
