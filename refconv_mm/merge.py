"""The deploy path: RefConv -> plain ``nn.Conv2d``, on a model or on a bare state dict."""
from collections import OrderedDict
from typing import Dict, List, Mapping

import torch
import torch.nn as nn

from .refconv import RefConv2d
from .refocus import refocus_kernel

__all__ = ['merge_refconv', 'merge_state_dict', 'refconv_prefixes', 'REFOCUS_KEY']

REFOCUS_KEY = 'refocus_weight'


def _plain_conv(m: RefConv2d) -> nn.Conv2d:
    conv = m.make_plain()
    with torch.no_grad():
        conv.weight.copy_(m.refocused_kernel())
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    # What the model froze (frozen_stages) stays frozen; the rest trains as before conversion.
    conv.requires_grad_(m.refocus_weight.requires_grad)
    conv.train(m.training)
    return conv


@torch.no_grad()
def merge_refconv(model: nn.Module) -> nn.Module:
    """Replace every :class:`RefConv2d` in ``model`` by its plain conv, in place.

    The plain conv (``nn.Conv2d``, or the class :func:`convert_to_refconv` replaced)
    holds the refocused kernel ``W_b + T(W_b)``, so outputs are unchanged and
    ``model.state_dict()`` has the keys the original (plain) config builds; a frozen
    refocusing weight leaves a frozen plain weight. Returns ``model`` (or the new conv
    if ``model`` is a RefConv). The inverse of :func:`convert_to_refconv`.
    """
    if isinstance(model, RefConv2d):
        return _plain_conv(model)
    plain = {}  # id(RefConv) -> plain conv: a layer shared by two parents stays shared
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RefConv2d):
                if id(child) not in plain:
                    plain[id(child)] = _plain_conv(child)
                setattr(parent, name, plain[id(child)])
    return model


def refconv_prefixes(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Module prefixes (``'backbone.conv1.'``) of the RefConv layers in a state dict."""
    return [k[:-len(REFOCUS_KEY)] for k in state_dict if k.endswith('.' + REFOCUS_KEY)
            or k == REFOCUS_KEY]


@torch.no_grad()
def merge_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Merge a RefConv state dict into a plain one, without building a model.

    Each ``<prefix>refocus_weight`` is folded into ``<prefix>weight`` by
    :func:`refocus_kernel` and dropped; every other entry is kept, in order.
    The input is not modified.

    Raises:
        ValueError: if a ``refocus_weight`` has no basis ``weight`` beside it or
            their shapes do not fit.
    """
    prefixes = set(refconv_prefixes(state_dict))
    merged = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith(REFOCUS_KEY) and key[:-len(REFOCUS_KEY)] in prefixes:
            continue
        prefix = key[:-len('weight')] if key.endswith('weight') else None
        if prefix is not None and prefix in prefixes:
            refocus = state_dict[prefix + REFOCUS_KEY]
            # Merge in fp32 at least, then store in the basis dtype.
            dtype = torch.promote_types(value.dtype, torch.float32)
            value = refocus_kernel(value.to(dtype), refocus.to(dtype)).to(value.dtype)
        merged[key] = value
    missing = sorted(p for p in prefixes if p + 'weight' not in state_dict)
    if missing:
        raise ValueError(f'merge_state_dict: {REFOCUS_KEY} without a basis weight for '
                         f'{missing[:5]}; the state dict is incomplete or not a RefConv one.')
    if hasattr(state_dict, '_metadata'):
        merged._metadata = state_dict._metadata  # keep per-module versions for load_state_dict
    return merged
