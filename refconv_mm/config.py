"""Config helpers: derive the ORIGINAL plain config from a RefConv one."""
import copy

from mmengine.config import Config, ConfigDict

__all__ = ['plain_config', 'is_refconv_cfg', 'is_refconv_model_cfg']


def is_refconv_cfg(value) -> bool:
    """True for a ``conv_cfg`` that builds a RefConv."""
    return isinstance(value, dict) and value.get('type') in (
        'RefConv', 'RefConv2d', 'RefConv2dAdaptivePadding')


def is_refconv_model_cfg(value) -> bool:
    """True for a ``model`` dict of the whole-model route (``type='RefConvModel'``)."""
    return isinstance(value, dict) and value.get('type') == 'RefConvModel'


def _strip(node):
    if isinstance(node, dict):
        out = type(node)() if isinstance(node, ConfigDict) else {}
        for k, v in node.items():
            out[k] = None if k == 'conv_cfg' and is_refconv_cfg(v) else _strip(v)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_strip(v) for v in node)
    return node


def plain_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with every RefConv ``conv_cfg`` set back to ``None`` (plain conv), a
    ``RefConvModel`` replaced by the model it wraps, ``RefConvHook`` removed from
    ``custom_hooks`` and ``refconv_mm`` from ``custom_imports``: the ORIGINAL config."""
    d = copy.deepcopy(cfg.to_dict())
    if is_refconv_model_cfg(d.get('model')):
        from .convert import split_refconv_model
        d['model'] = split_refconv_model(d['model'])[0]  # the wrapper removed
    d = _strip(d)
    hooks = [h for h in d.get('custom_hooks') or [] if h.get('type') != 'RefConvHook']
    if 'custom_hooks' in d:
        d['custom_hooks'] = hooks
    imports = d.get('custom_imports')
    if imports:
        mods = [m for m in imports.get('imports', []) if m != 'refconv_mm']
        if mods:
            d['custom_imports'] = dict(imports, imports=mods)
        else:
            d.pop('custom_imports')
    d.pop('load_from', None)
    # the override's helper variable (refconv = dict(type='RefConv')) goes with the override
    for key in [k for k, v in d.items() if is_refconv_cfg(v)]:
        d.pop(key)
    return Config(d)
