"""RefConv: a drop-in ``nn.Conv2d`` whose kernel is refocused from a frozen basis."""
import inspect
import math
import weakref
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.cnn.bricks.conv_ws import ConvWS2d, conv_ws_2d
from mmengine.registry import MODELS
from torch.nn.modules.utils import _pair

from .refocus import (KernelRecompute, is_compiling, refocus_kernel, refocus_weight_shape,
                      refocused_conv2d)

__all__ = ['RefConv2d', 'RefConv2dAdaptivePadding', 'RefConvWS2d', 'build_refconv']

_IntOrPair = Union[int, Tuple[int, int]]
INIT_MODES = ('zero', 'official')


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing's recompute)."""
    graph_task_id = getattr(torch._C, '_current_graph_task_id', None)
    return graph_task_id is None or graph_task_id() != -1  # unknown torch: assume the worst


def _refuse_onnx_export() -> None:
    if torch.onnx.is_in_onnx_export():
        # Traced, the refocusing transform would run at inference: not the plain graph.
        raise RuntimeError(
            'RefConv: an unmerged RefConv layer cannot be exported to ONNX (the refocusing '
            'transform would be part of the graph). Merge first: python tools/merge_refconv.py '
            'REFCONV_CONFIG CKPT MERGED.pth, then export MERGED.pth with the original config, '
            'or use python tools/deploy_onnx.py in one step.')


@MODELS.register_module()
class RefConv2d(nn.Conv2d):
    """Re-parameterized Refocusing Convolution (arXiv 2310.10563).

    The conv's ``weight`` (and ``bias``) are the *basis*: the trained parameters
    of the conv this layer replaces, under the same state-dict keys, frozen at
    construction. ``refocus_weight`` parameterizes the refocusing transformation
    ``T`` and the conv runs with ``W = W_b + T(W_b)``
    (:func:`refconv_mm.refocus.refocus_kernel`). ``merge_refconv`` turns it back
    into a plain ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode: As ``nn.Conv2d``.
        map_k: Refocusing kernel size (odd). Along each axis it is capped at the
            largest odd number not above the conv's kernel size (so a 1x1 conv
            gets a 1x1 map and a 1x7 conv a 1x3 map).
        init: ``'zero'`` (default): ``T = 0``, so refocus training starts exactly
            at the pretrained function and cannot lose accuracy on step one.
            ``'official'``: the official code's ``nn.Conv2d`` default
            (Kaiming-uniform, a=sqrt(5)), which perturbs the kernel at start.
        transposed, output_padding: Accepted so that a wrong config fails
            clearly; RefConv has no transposed form.

    ``plain_type`` is the plain conv class that merging gives back: ``nn.Conv2d``,
    or the class :func:`refconv_mm.convert_to_refconv` replaced.

    A layer called several times per training step (a head shared by the FPN levels)
    computes its kernel once per step and every call uses that one autograd node, so the
    transform's forward and gradient run once, not once per call (:meth:`training_kernel`),
    and backward recomputes it once for all of them.

    Without grad (eval, or a layer frozen in training) the kernel is computed on every
    call from the weights the layer holds then, whatever wrote them (an optimizer, a
    ``load_state_dict``, EMA's ``.data`` swaps). Under autocast the refocusing math runs
    in the parameters' dtype and the conv casts the kernel as it casts any weight, so the
    layer computes what its merged conv computes, AMP or not. Under ``torch.compile`` the
    forward is the math and the conv, nothing the compiler has to step around.
    """

    plain_type: Type[nn.Conv2d] = nn.Conv2d

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1,
                 padding: Union[str, _IntOrPair] = 0,
                 dilation: _IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros',
                 map_k: int = 3,
                 init: str = 'zero',
                 transposed: bool = False,
                 output_padding: _IntOrPair = 0,
                 device=None,
                 dtype=None) -> None:
        if transposed or output_padding not in (0, (0, 0), [0, 0]):
            raise ValueError(
                f'RefConv: transposed={transposed!r}, output_padding={output_padding!r}: RefConv '
                'refocuses regular convs only; keep the transposed conv plain (no RefConv '
                'conv_cfg on that module).')
        for name, c in (('in_channels', in_channels), ('out_channels', out_channels)):
            if not isinstance(groups, int) or groups <= 0 or c % groups:
                raise ValueError(f'RefConv: {name}={c} is not divisible by groups={groups!r}; '
                                 'use a groups value that divides both channel counts.')
        if init not in INIT_MODES:
            raise ValueError(f'RefConv: init={init!r} is not one of {INIT_MODES}.')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        # Raises for an even or non-positive map_k.
        shape = refocus_weight_shape(out_channels, in_channels, groups, self.kernel_size, map_k)
        self.map_k = map_k
        self.init = init
        self.refocus_weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        # The basis is frozen before any optimizer or DDP wrapper sees the model.
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.basis_loaded = False
        self._reset_step_sharing()
        self.init_weights()

    # -- initialisation -------------------------------------------------
    def init_weights(self) -> None:
        """(Re)initialise the refocusing weights; the basis is left alone.

        ConvModule and mmengine's BaseModule call this instead of re-initialising
        the conv, so a head's ``init_cfg`` cannot overwrite ``refocus_weight``.
        """
        with torch.no_grad():
            if self.init == 'zero':
                self.refocus_weight.zero_()
            else:
                nn.init.kaiming_uniform_(self.refocus_weight, a=math.sqrt(5))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        basis = state_dict.get(prefix + 'weight')
        if basis is not None and tuple(basis.shape) == tuple(self.weight.shape):
            self.basis_loaded = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward --------------------------------------------------------
    def refocused_kernel(self) -> torch.Tensor:
        """The kernel the conv runs with, ``W_b + T(W_b)`` (autograd-tracked)."""
        return refocus_kernel(self.weight, self.refocus_weight)

    def _cache_key(self) -> tuple:
        w, r = self.weight, self.refocus_weight
        return (w.data_ptr(), w._version, r.data_ptr(), r._version, w.device, w.dtype, r.dtype)

    def needs_grad(self) -> bool:
        """Whether this call's kernel must be tracked by autograd (training, not frozen)."""
        return torch.is_grad_enabled() and (self.refocus_weight.requires_grad
                                            or self.weight.requires_grad)

    def _reset_step_sharing(self) -> None:
        # (weight key, kernel, its recompute, calls left) while later calls of the step reuse it
        self._step_kernel: Optional[Tuple[tuple, torch.Tensor, KernelRecompute, int]] = None
        self._calls = 0  # grad-tracked calls since backward last reached one of its kernels
        self._calls_per_step = 1  # learnt from the previous backward; 1 = share nothing

    def training_kernel(self) -> Tuple[torch.Tensor, KernelRecompute]:
        """The autograd-tracked kernel for a call under grad, shared by the calls of a step,
        and the :class:`KernelRecompute` that all those calls' backward share.

        The number of calls per step is learnt from the previous backward (the first
        step computes a kernel per call). The kernel is held only until the step's last
        call, and never reused once backward has reached it (gradient accumulation, a
        second forward) or while a backward runs (activation checkpointing recomputes).
        """
        if _in_backward():
            return self.refocused_kernel(), KernelRecompute(self.weight, self.refocus_weight)
        self._calls += 1
        key = self._cache_key()
        entry = self._step_kernel
        if entry is not None and entry[0] == key:
            _, kernel, recompute, left = entry
            self._step_kernel = (key, kernel, recompute, left - 1) if left > 1 else None
            return kernel, recompute
        kernel = self.refocused_kernel()
        recompute = KernelRecompute(self.weight, self.refocus_weight)
        if kernel.grad_fn is not None:
            kernel.grad_fn.register_prehook(_step_end_hook(self))
            if self._calls_per_step > 1:
                self._step_kernel = (key, kernel, recompute, self._calls_per_step - 1)
        return kernel, recompute

    def train(self, mode: bool = True) -> 'RefConv2d':
        self._step_kernel = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_onnx_export()
        padding = self.padding
        if self.padding_mode != 'zeros':
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if is_compiling() or not self.needs_grad():
            # Traced, or nothing for autograd: the math and the conv, nothing held across calls.
            return F.conv2d(x, self.refocused_kernel(), self.bias, self.stride, padding,
                            self.dilation, self.groups)
        kernel, recompute = self.training_kernel()
        return refocused_conv2d(x, self.weight, self.refocus_weight, self.bias, self.stride,
                                padding, self.dilation, self.groups, kernel, recompute)

    def make_plain(self) -> nn.Conv2d:
        """An empty conv of ``plain_type`` with this layer's geometry, device and dtype."""
        conv = self.plain_type(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                               self.padding, self.dilation, self.groups, self.bias is not None,
                               self.padding_mode)
        return conv.to(device=self.weight.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', map_k={self.map_k}, init={self.init}'

    def __getstate__(self) -> dict:
        # A held training kernel carries its autograd graph, which cannot be copied.
        # object.__getstate__ is Python >= 3.11 (and torch 2.0's Module has none)
        getstate = getattr(super(), '__getstate__', None)
        state = dict(getstate() if getstate is not None else self.__dict__)
        state.pop('_kernel_cache', None)  # an eval cache of refconv_mm <= 0.x: never used now
        return dict(state, _step_kernel=None)

    def __setstate__(self, state):
        state.pop('_kernel_cache', None)
        super().__setstate__(state)
        if '_calls' not in state:  # pickled by a refconv_mm without step sharing
            self._reset_step_sharing()


def _step_end_hook(layer: RefConv2d):
    """A pre-hook for a training kernel's autograd node: backward reached it, the step ended."""
    ref = weakref.ref(layer)  # the graph must not keep the layer alive

    def hook(grad_outputs):
        m = ref()
        if m is not None:
            if m._calls:  # the first of this backward's kernels: the step's call count
                m._calls_per_step, m._calls = m._calls, 0
            m._step_kernel = None  # its graph is being consumed: never hand it out again
    return hook


class RefConv2dAdaptivePadding(RefConv2d):
    """RefConv of mmcv's ``Conv2dAdaptivePadding`` (TensorFlow "SAME" padding per input size).

    Pads the input exactly as ``Conv2dAdaptivePadding.forward`` does, then runs the
    refocused conv; merging gives a ``Conv2dAdaptivePadding`` back.
    """

    plain_type = Conv2dAdaptivePadding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            out = math.ceil(size / s)
            pads.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
        pad_h, pad_w = pads
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)

    def make_plain(self) -> nn.Conv2d:
        conv = Conv2dAdaptivePadding(self.in_channels, self.out_channels, self.kernel_size,
                                     self.stride, self.padding, self.dilation, self.groups,
                                     self.bias is not None)
        return conv.to(device=self.weight.device, dtype=self.weight.dtype)


class RefConvWS2d(RefConv2d):
    """RefConv of mmcv's weight-standardised ``ConvWS2d``: the refocused kernel is standardised.

    ``W = WS(W_b + T(W_b))``, exactly what a ``ConvWS2d`` holding ``W_b + T(W_b)`` computes,
    so merging gives a ``ConvWS2d`` back. The kernel is kept for backward (no recompute).
    """

    plain_type = ConvWS2d

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_onnx_export()
        use_shared = self.needs_grad() and not is_compiling()
        kernel = self.training_kernel()[0] if use_shared else self.refocused_kernel()
        return conv_ws_2d(x, kernel, self.bias, self.stride, self.padding, self.dilation,
                          self.groups, self.eps)

    def make_plain(self) -> nn.Conv2d:
        conv = ConvWS2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, self.groups, self.bias is not None,
                        eps=self.eps)
        return conv.to(device=self.weight.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', eps={self.eps}'


_CONV_SIGNATURE = inspect.signature(nn.Conv2d.__init__)


@MODELS.register_module('RefConv')
def build_refconv(*args, spatial_only: bool = False, **kwargs) -> nn.Conv2d:
    """``conv_cfg=dict(type='RefConv', ...)``: a :class:`RefConv2d`, built as ``nn.Conv2d`` is.

    Args:
        *args, **kwargs: ``nn.Conv2d``'s arguments and RefConv2d's (``map_k``, ``init``).
        spatial_only: The official selection: refocus only convs with a spatial kernel and
            build 1x1 convs as plain ``nn.Conv2d`` (the official MobileNetV3 code refocuses
            the stem and the depthwise convs, never the 1x1 expand/project convs).
    """
    if spatial_only:
        plain_kwargs = {k: v for k, v in kwargs.items() if k not in ('map_k', 'init')}
        try:
            kernel_size = _CONV_SIGNATURE.bind(None, *args, **plain_kwargs).arguments['kernel_size']
        except TypeError:  # let RefConv2d name the bad argument
            kernel_size = None
        if kernel_size is not None and _pair(kernel_size) == (1, 1):
            return nn.Conv2d(*args, **plain_kwargs)
    return RefConv2d(*args, **kwargs)
