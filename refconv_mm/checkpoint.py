"""Checkpoint I/O: weights-only loading of mmengine checkpoints, atomic writes."""
import os
import pickle
import os.path as osp
import tempfile
from typing import Dict, Mapping, Optional

import torch

from .merge import merge_state_dict, refconv_prefixes

__all__ = ['allow_mmengine_checkpoints', 'load_checkpoint_file', 'save_merged_checkpoint',
           'atomic_save', 'check_state_dict_fits']


def _safe_globals() -> list:
    """The non-tensor types an mmengine Runner pickles into its checkpoints."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.config import ConfigDict
    types = [HistoryBuffer, ConfigDict, np.ndarray, np.dtype]
    # numpy arrays and scalars (HistoryBuffer, meta) unpickle through these.
    try:
        from numpy.core import multiarray  # numpy 1.x, the pinned stack
    except ImportError:  # pragma: no cover - numpy 2
        from numpy._core import multiarray
    types += [multiarray._reconstruct, multiarray.scalar]
    types += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                          np.int16, np.int8, np.uint8, np.bool_)]
    return types


def _history_buffer_getattr(obj, name: str):
    """Stands in for ``getattr`` while unpickling: only HistoryBuffer's statistics methods."""
    from mmengine.logging.history_buffer import HistoryBuffer
    # HistoryBuffer pickles its registered statistics as getattr(HistoryBuffer, 'mean') etc.
    allowed = {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refconv_mm: checkpoint asks for getattr({obj!r}, {name!r}); only mmengine '
        "HistoryBuffer statistics are allowed. Load it with weights_only=False only if you "
        'trust its source.')


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load``'s weights-only default read mmengine's own checkpoints.

    torch >= 2.6 loads with ``weights_only=True``; mmengine 0.10.7 calls
    ``torch.load`` without the argument and so cannot read what its Runner
    wrote (message hub history, numpy scalars). Rather than turning weights-only
    loading off, allow-list exactly those types: any other pickled object is
    still refused.
    """
    torch.serialization.add_safe_globals(
        _safe_globals() + [(_history_buffer_getattr, 'builtins.getattr')])


def load_checkpoint_file(path: str) -> Dict:
    """Load a checkpoint file weights-only onto the CPU, with a one-line error on failure."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    allow_mmengine_checkpoints()
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'cannot read checkpoint {path!r} (truncated, corrupt or holding '
                         f'non-weight objects): {first}') from None
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict')
    return ckpt


def check_state_dict_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                          config: str, checkpoint: str) -> None:
    """Raise a one-line ``ValueError`` unless ``state_dict`` has exactly ``model``'s keys/shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or shape:
        parts = [f'{len(x)} {name} (e.g. {x[0]})' for x, name in
                 ((missing, 'missing keys'), (unexpected, 'unexpected keys'),
                  (shape, 'shape mismatches')) if x]
        raise ValueError(f'config {config!r} does not match checkpoint {checkpoint!r}: '
                         + '; '.join(parts))


def atomic_save(obj, path: str, overwrite: bool = False) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    if osp.exists(path) and not overwrite:
        raise FileExistsError(f'{path!r} exists; pass --force (overwrite=True) to replace it')
    d = osp.dirname(osp.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix='.tmp', dir=d)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def save_merged_checkpoint(state_dict: Mapping[str, torch.Tensor], out: str,
                           meta: Optional[dict] = None, overwrite: bool = False) -> int:
    """Merge a RefConv state dict and write it as a plain mmengine checkpoint.

    Returns the number of RefConv layers merged. ``meta`` is kept (mmseg's
    ``init_model`` reads it) with a ``refconv_mm`` note of the merge.
    """
    n = len(refconv_prefixes(state_dict))
    merged = merge_state_dict(state_dict)
    meta = dict(meta or {})
    from .version import __version__
    meta['refconv_mm'] = dict(merged_layers=n, version=__version__)
    atomic_save(dict(meta=meta, state_dict=merged), out, overwrite=overwrite)
    return n
