"""The refocusing transformation: the one place where RefConv's math lives.

A conv kernel ``W_b`` of shape ``(Cout, Cin/g, kh, kw)`` is viewed as a one-image
batch ``(1, Cout*Cin/g, kh, kw)`` of 2-D kernels. The refocusing transformation
``T`` is a conv over that image with ``Cin*Cout/g^2`` groups (each group maps
``g`` kernels to ``g`` kernels), zero padding ``map // 2`` and no bias, and the
kernel actually used is ``W = W_b + T(W_b)`` (RefConv, arXiv 2310.10563).

For a regular conv (g=1) every 2-D kernel is refocused on its own; for a
depthwise conv (g=Cin=Cout) a single group mixes all channels' kernels.
The layer's forward (with and without grad, eager and compiled, under autocast or not),
the recompute for backward and the state-dict merge all call :func:`refocus_kernel`.
"""
import contextlib
from typing import ContextManager, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['KernelRecompute', 'autocast_dtype', 'is_compiling', 'refocus_kernel',
           'refocus_map_size', 'refocus_weight_shape', 'refocused_conv2d']


def is_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the caller."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):  # torch >= 2.3
        return compiler.is_compiling()
    dynamo = getattr(torch, '_dynamo', None)  # torch 2.0-2.2
    return bool(dynamo is not None and dynamo.is_compiling())


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts a conv's weight to on ``device_type`` now; None when it is off."""
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4: one API for every device type
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
            return None
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == 'cuda':  # torch 2.0-2.3
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _autocast_off(device_type: str) -> ContextManager:
    # Under compile the state is unknown until run time: always leave autocast explicitly.
    if is_compiling() and device_type in ('cpu', 'cuda'):
        return torch.autocast(device_type, enabled=False)
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def refocus_map_size(kernel_size: Tuple[int, int], map_k: int) -> Tuple[int, int]:
    """Size of the refocusing kernel for a conv kernel of ``kernel_size``.

    Along each axis the map is ``min(map_k, largest odd number <= kernel size)``:
    an odd map with padding ``map // 2`` keeps the kernel's shape, and a map wider
    than the kernel would only ever see its zero padding.

    Args:
        kernel_size: ``(kh, kw)`` of the conv being refocused.
        map_k: The requested (odd, positive) refocusing kernel size.

    Returns:
        ``(mh, mw)``, both odd.
    """
    if not isinstance(map_k, int) or isinstance(map_k, bool) or map_k <= 0 or map_k % 2 == 0:
        raise ValueError(f'RefConv: map_k={map_k!r} must be a positive odd integer '
                         '(e.g. map_k=3, the paper\'s default) so that T keeps the kernel shape.')
    return tuple(min(map_k, k if k % 2 else k - 1) for k in kernel_size)


def refocus_weight_shape(out_channels: int, in_channels: int, groups: int,
                         kernel_size: Tuple[int, int], map_k: int) -> Tuple[int, int, int, int]:
    """Shape of the refocusing weights ``(Cout*Cin/g, g, mh, mw)`` for a conv."""
    mh, mw = refocus_map_size(kernel_size, map_k)
    return (out_channels * in_channels // groups, groups, mh, mw)


def refocus_kernel(basis: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    """Return the refocused kernel ``W_b + T(W_b)``, in the basis' dtype.

    The math runs in the parameters' dtype whatever autocast says: the kernel is a weight,
    and the conv that uses it casts it as autocast casts any weight. So a RefConv under AMP
    computes exactly what the merged plain conv computes under AMP.

    Args:
        basis: The frozen basis kernel, shape ``(Cout, Cin/g, kh, kw)``.
        refocus_weight: The refocusing weights, shape ``(Cout*Cin/g, g, mh, mw)``
            with odd ``mh, mw``; ``g`` (the conv's groups) is read from it.

    Returns:
        A kernel with the shape, dtype and device of ``basis``.
    """
    n, g, mh, mw = refocus_weight.shape
    cout, cin_g, kh, kw = basis.shape
    if n != cout * cin_g:
        raise ValueError(f'RefConv: refocus weight of shape {tuple(refocus_weight.shape)} does not '
                         f'fit a basis of shape {tuple(basis.shape)} (expected {cout * cin_g} '
                         '2-D kernels in dim 0).')
    if refocus_weight.dtype != basis.dtype:  # e.g. a half model with fp32 refocusing weights
        refocus_weight = refocus_weight.to(basis.dtype)
    with _autocast_off(basis.device.type):
        return _refocus(basis, refocus_weight)


def _refocus(basis: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    n, g, mh, mw = refocus_weight.shape
    cout, cin_g, kh, kw = basis.shape
    if g == 1:
        if mh == mw == 1:  # one scale per kernel: a product, not a conv with N groups
            return torch.addcmul(basis, basis, refocus_weight.view(cout, cin_g, 1, 1))
        # Each kernel has its own map: a conv with N groups, which oneDNN runs fastest.
        flat = basis.reshape(1, n, kh, kw)
        mapped = F.conv2d(flat, refocus_weight, None, 1, (mh // 2, mw // 2), 1, n)
        # In place: neither conv's backward reads its output, and it saves a kernel-sized buffer.
        return mapped.add_(flat).view_as(basis)
    # Grouped/depthwise: one GEMM per group of g kernels over the kernels' shifted copies
    # (unfold), whose backward writes the large refocus gradient once, with no zero fill.
    shifted = F.unfold(basis.reshape(1, n, kh, kw), (mh, mw), padding=(mh // 2, mw // 2))
    # Column-major shifted copies: the skinny GEMM runs ~2x faster in this layout on CPU.
    shifted = shifted.view(n // g, g * mh * mw, kh * kw).transpose(1, 2).contiguous()
    mixed = torch.bmm(refocus_weight.reshape(n // g, g, g * mh * mw), shifted.transpose(1, 2))
    return mixed.add_(basis.reshape(mixed.shape)).view_as(basis)


class KernelRecompute:
    """Recomputes a refocused kernel for backward, once for all the convs that saved it.

    Each conv that saves the kernel registers (:meth:`pack`); the first :meth:`unpack` in
    backward recomputes it, the others reuse it, and the last one drops it, so a kernel
    shared by several calls is recomputed once and held only while its convs' backward runs.
    """

    def __init__(self, basis: torch.Tensor, refocus_weight: torch.Tensor) -> None:
        self.basis, self.refocus_weight = basis, refocus_weight
        self.pending = 0
        self.kernel: Optional[torch.Tensor] = None

    def pack(self) -> None:
        """A conv saved the kernel (forward)."""
        self.pending += 1

    def unpack(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel for one conv's backward, in the ``dtype`` that conv saved (AMP)."""
        kernel = self.kernel
        if kernel is None:
            with torch.no_grad():
                kernel = refocus_kernel(self.basis, self.refocus_weight)
        self.pending -= 1  # below zero after a retain_graph backward: recompute, keep nothing
        self.kernel = kernel if self.pending > 0 else None
        return kernel.to(dtype)


def refocused_conv2d(x: torch.Tensor, basis: torch.Tensor, refocus_weight: torch.Tensor,
                     bias: Optional[torch.Tensor], stride=1, padding=0, dilation=1,
                     groups: int = 1, kernel: Optional[torch.Tensor] = None,
                     recompute: Optional[KernelRecompute] = None) -> torch.Tensor:
    """``F.conv2d`` with the kernel ``refocus_kernel(basis, refocus_weight)``, under autograd.

    For g=1 the kernel is as large as the refocusing weights, so keeping every layer's
    kernel until backward (the conv saves its weight) would add the model's size to peak
    memory: the conv saves a note instead and the kernel is recomputed when backward needs
    it. For g>1 the kernel is g times smaller than the refocusing weights and is kept.

    ``kernel``, when given, must be ``refocus_kernel(basis, refocus_weight)`` already
    computed (a layer called several times per step shares one, see ``RefConv2d``), and
    ``recompute`` the one :class:`KernelRecompute` of every call that uses that kernel.

    Under autocast the conv runs on the kernel cast as autocast casts any weight (so the
    result is the merged conv's under autocast); under ``torch.compile`` the compiler
    decides what backward keeps, so the conv is traced as it is.
    """
    if kernel is None:
        kernel = refocus_kernel(basis, refocus_weight)
    if groups > 1 or not (torch.is_grad_enabled() and kernel.requires_grad) or is_compiling():
        return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)
    cast = autocast_dtype(kernel.device.type)
    if cast is not None and kernel.dtype not in (cast, torch.float64):
        # The cast autocast would make inside the conv, made here so that the tensor the conv
        # saves is one this function knows (and recomputes) rather than an anonymous copy.
        kernel = kernel.to(cast)
    kernel_id = (kernel.data_ptr(), kernel.shape, kernel.dtype)  # no reference kept to it
    if recompute is None:
        recompute = KernelRecompute(basis, refocus_weight)

    def pack(t: torch.Tensor):
        if (t.data_ptr(), t.shape, t.dtype) != kernel_id:
            return t
        recompute.pack()
        return t.dtype  # a note, not the tensor: backward recomputes it

    def unpack(packed):
        return recompute.unpack(packed) if isinstance(packed, torch.dtype) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)
