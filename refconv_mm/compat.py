"""The supported range of torch / mmcv / mmengine, checked at ``import refconv_mm``.

Ranges (docs/installation.md, "Install into your environment"): the low ends are the oldest stack tested
(requirements/oldest.txt), the high ends the pinned one (requirements/runtime.txt).
"""
import re
from typing import Tuple

__all__ = ['SUPPORTED', 'COMPILE_MIN_TORCH', 'parse_version', 'check_environment',
           'torch_version']

# name -> (lowest allowed, first refused, the pip requirement that names the range)
SUPPORTED = {
    'torch': ((2, 0, 0), (2, 14, 0), 'torch>=2.0,<2.14'),
    'mmcv': ((2, 0, 0), (2, 2, 0), 'mmcv>=2.0.0,<2.2.0'),
    'mmengine': ((0, 10, 0), (1, 0, 0), 'mmengine>=0.10.0,<1.0.0'),
}
# torch.compile with RefConv: torch 2.0's dynamo does not tell traced code that it traces
# (torch._dynamo.is_compiling() is False there), so the layer cannot take its traceable path.
COMPILE_MIN_TORCH = (2, 1, 0)
# What to run for each, said in the error (mmcv's compiled ops are built for one torch).
_FIX = {
    'torch': 'install a torch in that range with an mmcv built for it '
             '(`mim install "mmcv>=2.0.0,<2.2.0"`), or build the pinned stack with `make env`',
    'mmcv': 'run `mim install "mmcv>=2.0.0,<2.2.0"` (mmdet 3.x and mmseg 1.x refuse mmcv 2.2)',
    'mmengine': 'run `pip install "mmengine>=0.10.0,<1.0.0"`',
}


def parse_version(text: str) -> Tuple[int, int, int]:
    """``'2.0.1+cu117'`` -> ``(2, 0, 1)``: release numbers; local and pre-release tags dropped."""
    m = re.match(r'\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?', str(text))
    if not m:
        raise ValueError(f'cannot read a version number from {text!r}')
    return tuple(int(x or 0) for x in m.groups())


def torch_version() -> Tuple[int, int, int]:
    """The installed torch's release numbers."""
    import torch
    return parse_version(torch.__version__)


def check_environment() -> None:
    """Raise a one-sentence ``ImportError`` unless torch, mmcv and mmengine are in range."""
    import importlib
    for name, (low, high, req) in SUPPORTED.items():
        try:
            found = importlib.import_module(name).__version__
        except ImportError as e:
            raise ImportError(f'refconv_mm needs {req} but cannot import {name} ({e}): '
                              f'{_FIX[name]}.') from None
        if not low <= parse_version(found) < high:
            raise ImportError(f'refconv_mm supports {req}, found {name} {found}: {_FIX[name]}.')
