"""Whole-model conversion: every 2-D conv of a model (or of its selected parts) -> RefConv.

``convert_to_refconv`` is the inverse of :func:`refconv_mm.merge_refconv`. It reaches the
convs that mmdet/mmseg/mmpretrain build without ``conv_cfg`` (``retina_cls``, ``conv_seg``,
``rpn_conv``, separable ASPP convs, ``Conv2dAdaptivePadding`` stems, ...). ``RefConvModel``
is its config form.
"""
import copy
import fnmatch
from typing import Dict, Iterable, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.cnn.bricks.conv_ws import ConvWS2d
from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
from mmengine.registry import MODELS

from .refconv import RefConv2d, RefConv2dAdaptivePadding, RefConvWS2d

__all__ = ['convert_to_refconv', 'RefConvModel', 'REFCONV_MODEL_OPTIONS', 'split_refconv_model']

Patterns = Optional[Union[str, Sequence[str]]]

# Plain conv classes whose forward RefConv reproduces exactly, and the RefConv that does.
# mmcv's Conv2d only adds an empty-input path for torch < 1.4; nn.Conv2d covers it.
REFCONV_FOR: Dict[type, Type[RefConv2d]] = {
    nn.Conv2d: RefConv2d,
    MMCVConv2d: RefConv2d,
    Conv2dAdaptivePadding: RefConv2dAdaptivePadding,
    ConvWS2d: RefConvWS2d,
}
# The keyword arguments of RefConvModel that are conversion options, not model keys.
REFCONV_MODEL_OPTIONS = ('include', 'exclude', 'spatial_only', 'map_k', 'init')


def _as_list(patterns: Patterns) -> List[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) names ``name`` or one of the modules it sits in."""
    parts = name.split('.')
    return any(fnmatch.fnmatchcase('.'.join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _check_patterns(names: Iterable[str], patterns: List[str], what: str) -> None:
    names = [n for n in names if n]
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if unmatched:
        sample = ', '.join(sorted({n.split('.')[0] for n in names})[:12])
        raise ValueError(f'convert_to_refconv: {what}={unmatched!r} matches no module of the '
                         f'model. Patterns are fnmatch globs over module names and select '
                         f"submodules too (e.g. 'backbone', 'backbone.layer[12]', '*.conv_seg'); "
                         f'top-level modules here: {sample}.')


def _refconv_of(conv: nn.Conv2d, options: dict) -> RefConv2d:
    cls = REFCONV_FOR[type(conv)]
    if cls is RefConvWS2d:
        options = dict(options, eps=conv.eps)
    ref = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
              device=conv.weight.device, dtype=conv.weight.dtype, **options)
    with torch.no_grad():
        ref.weight.copy_(conv.weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    if type(conv) is not cls.plain_type:
        ref.plain_type = type(conv)  # merge gives the same class back
    # A conv the model froze (e.g. frozen_stages) keeps its refocusing weights frozen.
    ref.refocus_weight.requires_grad_(conv.weight.requires_grad)
    ref.basis_loaded = True  # the basis is the conv's current weight, as the caller holds it
    ref.train(conv.training)
    return ref


def _check_supported(convs: Dict[str, nn.Conv2d]) -> None:
    unsupported = [f"{n or '<the model itself>'} ({type(m).__module__}.{type(m).__qualname__})"
                   for n, m in convs.items() if type(m) not in REFCONV_FOR]
    if unsupported:
        raise ValueError(
            f'convert_to_refconv: {len(unsupported)} conv(s) are Conv2d subclasses whose '
            f'forward RefConv cannot reproduce exactly: {", ".join(unsupported[:5])}'
            f'{" ..." if len(unsupported) > 5 else ""}. Leave them plain with exclude=[...].')


def convert_to_refconv(model: nn.Module,
                       include: Patterns = None,
                       exclude: Patterns = None,
                       spatial_only: bool = False,
                       **refconv_options) -> nn.Module:
    """Replace every 2-D conv in the selected submodules of ``model`` by a RefConv, in place.

    Each new :class:`RefConv2d` has the conv's current weight and bias as its frozen basis,
    the conv's geometry, training flag, device and dtype, and (with the default
    ``init='zero'``) computes exactly what the conv computed. ``nn.Conv2d``, mmcv's
    ``Conv2d``, ``Conv2dAdaptivePadding`` and ``ConvWS2d`` are converted; transposed convs and
    existing RefConvs are left alone. :func:`refconv_mm.merge_refconv` is the inverse.

    Args:
        model: The model (or a single conv, for which the new RefConv is returned).
        include: fnmatch patterns of module names to convert (a pattern selects the named
            module and everything inside it); ``None``: the whole model.
        exclude: Patterns of module names to leave plain, applied after ``include``.
        spatial_only: Keep 1x1 convs plain (the official selection: only convs with a
            spatial kernel are refocused).
        **refconv_options: :class:`RefConv2d` options (``map_k``, ``init``).

    Returns:
        ``model``, converted.

    Raises:
        ValueError: no conv to convert, a pattern that matches no module, or a conv
            subclass whose behaviour RefConv cannot keep exactly (named with its class).
    """
    if isinstance(model, nn.Conv2d) and not isinstance(model, RefConv2d):
        _check_supported({'': model})
        return _refconv_of(model, refconv_options)
    include, exclude = _as_list(include), _as_list(exclude)
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_patterns(modules, include, 'include')
    _check_patterns(modules, exclude, 'exclude')
    selected = {}
    for name, m in modules.items():
        if not name or not isinstance(m, nn.Conv2d) or isinstance(m, RefConv2d):
            continue
        if include and not any(_matches(name, p) for p in include):
            continue
        if any(_matches(name, p) for p in exclude):
            continue
        if spatial_only and m.kernel_size == (1, 1):
            continue
        selected[name] = m
    _check_supported(selected)
    # A conv shared by a selected and an unselected parent cannot both stay tied and stay plain.
    split = sorted({n for n, m in modules.items()
                    if n and n not in selected and any(m is c for c in selected.values())})
    if split:
        raise ValueError(f'convert_to_refconv: {split[0]!r} is the same conv as a selected module '
                         'but is not selected itself (a shared conv); select or exclude all '
                         'names it has, or converting it would untie the shared weights.')
    if not selected:
        raise ValueError('convert_to_refconv: no 2-D conv to convert'
                         + (f' (include={include!r}, exclude={exclude!r}, '
                            f'spatial_only={spatial_only})' if include or exclude or spatial_only
                            else '; the model has no nn.Conv2d') + '.')
    new = {}  # id(conv) -> RefConv, so a conv shared by two parents stays shared
    for name, conv in selected.items():
        ref = new.get(id(conv))
        if ref is None:
            ref = new[id(conv)] = _refconv_of(conv, refconv_options)
        parent_name, _, child = name.rpartition('.')
        setattr(modules[parent_name], child, ref)
    return model


def split_refconv_model(model_cfg: dict) -> tuple:
    """Split a ``RefConvModel`` config into ``(inner model dict, conversion options)``.

    Keys besides ``type``, ``model`` and the options are the Runner's and the inference
    APIs' additions (``data_preprocessor``, ``train_cfg``, ``pretrained``, ...) or the base
    model's keys when the config did not ``_delete_`` them; they go into the inner model.
    The injected ``data_preprocessor`` does not replace one the inner model has, as the
    Runner would not.
    """
    cfg = dict(model_cfg)
    cfg.pop('type', None)
    inner = cfg.pop('model', None)
    if not isinstance(inner, dict):
        raise ValueError(
            "RefConvModel: 'model' must be the original model dict, e.g. "
            "model = dict(_delete_=True, type='RefConvModel', model=_base_.model); got "
            f'{type(inner).__name__}.')
    options = {k: cfg.pop(k) for k in REFCONV_MODEL_OPTIONS if k in cfg}
    inner = copy.deepcopy(inner)
    preprocessor = cfg.pop('data_preprocessor', None)
    if preprocessor is not None:
        inner.setdefault('data_preprocessor', preprocessor)
    for key, value in cfg.items():
        inner[key] = copy.deepcopy(value)
    return inner, options


@MODELS.register_module()
def RefConvModel(**cfg) -> nn.Module:  # noqa: N802 (a type name in configs)
    """Build ``model`` in the config's scope and convert it with :func:`convert_to_refconv`.

    Config form (in a config that inherits any mmdet/mmseg/mmpretrain config)::

        model = dict(_delete_=True, type='RefConvModel', model=_base_.model,
                     include=None, exclude=None, spatial_only=False, map_k=3, init='zero')

    The built model is the original class with plain state-dict keys, so ``load_from``
    fills the bases and the merged checkpoint loads into the original config.
    """
    inner, options = split_refconv_model(cfg)
    model = MODELS.build(inner)
    convert_to_refconv(model, **options)
    for m in model.modules():
        if isinstance(m, RefConv2d):
            m.basis_loaded = False  # freshly built: a checkpoint must still fill the basis
    return model
