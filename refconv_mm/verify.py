"""Run the same random input through two mmdet/mmseg/mmpretrain models; compare raw outputs."""
import copy
from typing import List, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.structures import BaseDataElement

__all__ = ['build_model', 'random_batch', 'flat_outputs', 'max_output_diff']


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` in the config's default scope (eval mode, CPU)."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    # Some models (mmseg's EncoderDecoder) write into the config they are built from.
    model = MODELS.build(copy.deepcopy(cfg.model))
    return model.eval()


def _sample_type(model: nn.Module):
    mod = type(model).__module__
    if mod.startswith('mmseg'):
        from mmseg.structures import SegDataSample
        return SegDataSample
    if mod.startswith('mmdet'):
        from mmdet.structures import DetDataSample
        return DetDataSample
    if mod.startswith('mmpretrain'):
        from mmpretrain.structures import DataSample
        return DataSample
    return BaseDataElement


def random_batch(model: nn.Module, size: Tuple[int, int] = (128, 128), batch: int = 1,
                 seed: int = 0) -> Tuple[torch.Tensor, list]:
    """A seeded random image batch (already normalised) and matching data samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g)
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size, batch_input_shape=size,
                scale_factor=(1.0, 1.0))
    cls = _sample_type(model)
    return x, [cls(metainfo=meta) for _ in range(batch)]


def flat_outputs(out) -> List[torch.Tensor]:
    """All tensors in a (nested) model output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_outputs(v)]
    if isinstance(out, BaseDataElement):
        return [t for k in sorted(out.keys()) for t in flat_outputs(out.get(k))]
    return []


@torch.no_grad()
def max_output_diff(model_a: nn.Module, model_b: nn.Module, size=(128, 128),
                    seed: int = 0) -> Tuple[float, float]:
    """``(max |a - b|, max |b|)`` over the raw ('tensor' mode) outputs of both models."""
    x, samples = random_batch(model_a, size, seed=seed)
    outs = []
    for m in (model_a, model_b):
        m.eval()
        outs.append(flat_outputs(m(x, samples, mode='tensor')))
    a, b = outs
    if len(a) != len(b) or not a:
        raise RuntimeError(f'models returned {len(a)} and {len(b)} tensors; cannot compare')
    shapes = [(tuple(ta.shape), tuple(tb.shape)) for ta, tb in zip(a, b) if ta.shape != tb.shape]
    if shapes:  # broadcasting would compare unrelated outputs
        raise RuntimeError(f'models returned outputs of different shapes, e.g. {shapes[0]}')
    pairs = [(ta, tb) for ta, tb in zip(a, b) if tb.numel()]
    diff = max(((ta - tb).abs().max().item() for ta, tb in pairs), default=0.0)
    scale = max((tb.abs().max().item() for _, tb in pairs), default=0.0)
    return diff, scale
