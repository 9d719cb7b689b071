"""Checkpoint I/O: weights-only loading of mmengine checkpoints, atomic writes."""
import os
import pickle
import os.path as osp
import tempfile
from typing import Dict, Mapping, Optional

import torch

from .merge import merge_state_dict, refconv_prefixes

__all__ = ['allow_mmengine_checkpoints', 'load_checkpoint_file', 'safe_torch_load',
           'save_merged_checkpoint',
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


# torch >= 2.6 loads weights-only by default and takes allow-lists as (object, 'module.name')
# pairs; older torch cannot extend its weights-only unpickler (torch 2.0 has no allow-list and
# refuses to BUILD any non-tensor object), so there refconv_mm unpickles with a restricted one.
_WEIGHTS_ONLY_DEFAULT = (2, 6, 0)


def _restricted_globals() -> Dict[str, object]:
    """``'module.name'`` -> object: what the restricted unpickler may look up, nothing else."""
    from torch import _weights_only_unpickler
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    # every dtype (torch 2.0's own list lacks bool, uint8, bfloat16 ...)
    allowed.update({f'torch.{n}': t for n, t in vars(torch).items() if isinstance(t, torch.dtype)})
    for obj in _safe_globals():
        allowed[f'{obj.__module__}.{obj.__qualname__}'] = obj
        allowed[f'{obj.__module__}.{obj.__name__}'] = obj
    allowed['builtins.getattr'] = _history_buffer_getattr
    # protocol-2 pickles of numpy arrays carry their bytes as _codecs.encode(str, 'latin1');
    # newer torch's weights-only unpickler allows it too
    import _codecs
    allowed['_codecs.encode'] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the allow-listed globals: a pickle cannot reach code to run."""

    _allowed: Dict[str, object] = {}

    def find_class(self, module: str, name: str):
        """Return an allow-listed global; refuse any other before importing anything."""
        import _compat_pickle
        # torch.save's protocol 2 writes Python 2 names (__builtin__.getattr), as pickle maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = self._allowed.get(f'{module}.{name}')
        if obj is None:
            raise pickle.UnpicklingError(
                f'refconv_mm: checkpoint holds {module}.{name}, which is not a weight nor one of '
                "mmengine's checkpoint types. Load it with torch.load(..., weights_only=False) "
                'only if you trust its source.')
        return obj


def _restricted_pickle_module():
    """A ``pickle_module`` for ``torch.load`` whose Unpickler is :class:`_RestrictedUnpickler`."""
    import types
    mod = types.ModuleType('refconv_mm_restricted_pickle')
    _RestrictedUnpickler._allowed = _restricted_globals()
    mod.Unpickler = _RestrictedUnpickler
    mod.UnpicklingError = pickle.UnpicklingError
    mod.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
    return mod


def safe_torch_load(f, map_location=None):
    """``torch.load`` that reads weights and mmengine checkpoints and refuses any other pickle.

    On torch >= 2.6 this is ``weights_only=True`` with the allow-list; on older torch the same
    allow-list is enforced by a restricted unpickler (``pickle.UnpicklingError`` otherwise).
    """
    from .compat import torch_version
    if torch_version() >= _WEIGHTS_ONLY_DEFAULT:
        allow_mmengine_checkpoints()
        return torch.load(f, map_location=map_location, weights_only=True)
    return torch.load(f, map_location=map_location, pickle_module=_restricted_pickle_module(),
                      weights_only=False)


def _load_from_local(filename: str, map_location=None):
    """mmengine's loader for local paths, unpickling through :func:`safe_torch_load`."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return safe_torch_load(filename, map_location=map_location)


def allow_mmengine_checkpoints() -> None:
    """Let mmengine's checkpoint loading read its own checkpoints, and refuse other pickles.

    torch >= 2.6 loads with ``weights_only=True``; mmengine 0.10.7 calls
    ``torch.load`` without the argument and so cannot read what its Runner
    wrote (message hub history, numpy scalars). Rather than turning weights-only
    loading off, allow-list exactly those types: any other pickled object is
    still refused. Older torch (no ``add_safe_globals``, weights-only off by default):
    mmengine's local-file loader is replaced by one with the same allow-list, so
    ``load_from``, ``resume`` and ``Pretrained`` behave as on the pinned torch.
    """
    from .compat import torch_version
    if torch_version() >= _WEIGHTS_ONLY_DEFAULT:
        torch.serialization.add_safe_globals(
            _safe_globals() + [(_history_buffer_getattr, 'builtins.getattr')])
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=_load_from_local, force=True)


def load_checkpoint_file(path: str) -> Dict:
    """Load a checkpoint file weights-only onto the CPU, with a one-line error on failure."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    allow_mmengine_checkpoints()
    try:
        ckpt = safe_torch_load(path, map_location='cpu')
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
