"""Deploy a merged model through mmdeploy: ONNX export, ONNX Runtime check, Conv-node count.

Optional part of the package (``pip install refconv_mm[deploy]``): mmdeploy, onnx and
onnxruntime are imported only inside these functions.
"""
import contextlib
import copy
import functools
import os
import os.path as osp
import shutil
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

__all__ = ['CODEBASES', 'codebase_of', 'deploy_config', 'torchscript_onnx_export',
           'check_deployable', 'export_onnx', 'onnx_conv_report', 'ort_session',
           'compare_with_pytorch', 'ort_latency']

# Deploy configs as mmdeploy's own configs/<codebase>/*_onnxruntime_static.py write them (the
# wheel ships none). Segmentation keeps the logits (with_argmax=False) so ONNX Runtime and
# PyTorch can be compared as floats; mmdeploy's segmentor wrapper takes the argmax itself.
CODEBASES: Dict[str, dict] = {
    'mmdet': dict(
        output_names=['dets', 'labels'],
        codebase_config=dict(type='mmdet', task='ObjectDetection', model_type='end2end',
                             post_processing=dict(score_threshold=0.05, confidence_threshold=0.005,
                                                  iou_threshold=0.5, max_output_boxes_per_class=200,
                                                  pre_top_k=5000, keep_top_k=100,
                                                  background_label_id=-1))),
    'mmseg': dict(output_names=['output'],
                  codebase_config=dict(type='mmseg', task='Segmentation', with_argmax=False)),
    'mmpretrain': dict(output_names=['output'],
                       codebase_config=dict(type='mmpretrain', task='Classification')),
}

MERGE_HINT = ('merge it first: python tools/merge_refconv.py REFCONV_CONFIG CKPT MERGED.pth, or '
              'export in one step with python tools/deploy_onnx.py')


def codebase_of(model_cfg: Config) -> str:
    """'mmdet', 'mmseg' or 'mmpretrain', from the config's ``default_scope``."""
    scope = model_cfg.get('default_scope')
    if scope not in CODEBASES:
        raise ValueError(f"config default_scope {scope!r} is not one of {sorted(CODEBASES)}; "
                         "set default_scope in the config (or --cfg-options default_scope=mmdet)")
    return scope


def deploy_config(codebase: str, input_shape: Tuple[int, int], opset: int = 11) -> Config:
    """mmdeploy deploy config (onnx_config, codebase_config, backend_config) for ONNX Runtime.

    ``input_shape`` is ``(H, W)``; the export is static in shape, as mmdeploy's
    ``*_onnxruntime_static.py`` configs.
    """
    spec = CODEBASES[codebase]
    h, w = input_shape
    return Config(dict(
        onnx_config=dict(type='onnx', export_params=True, keep_initializers_as_inputs=False,
                         opset_version=opset, save_file='end2end.onnx', input_names=['input'],
                         output_names=list(spec['output_names']), input_shape=[w, h],
                         optimize=True),
        codebase_config=copy.deepcopy(spec['codebase_config']),
        backend_config=dict(type='onnxruntime')))


@contextlib.contextmanager
def torchscript_onnx_export() -> Iterator[None]:
    """Make ``torch.onnx.export`` default to the TorchScript exporter (``dynamo=False``).

    torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript and ignores the
    TorchScript symbolic rewriters that mmdeploy 1.3.1 registers; mmdeploy passes no
    ``dynamo`` argument, so without this its export fails on ``import onnxscript``.
    """
    orig = torch.onnx.export

    @functools.wraps(orig)
    def export(*args, **kwargs):
        kwargs.setdefault('dynamo', False)
        return orig(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = orig


def check_deployable(model_cfg: Config, state_dict: Optional[dict] = None) -> None:
    """Refuse an unmerged RefConv config or checkpoint, with the command that merges it.

    mmdeploy loads checkpoints non-strictly: a refocused checkpoint with the ORIGINAL config
    would silently export the un-refocused basis.
    """
    from .config import plain_config
    from .merge import refconv_prefixes
    if plain_config(model_cfg).model != model_cfg.model:
        raise ValueError(f'the config builds RefConv layers (unmerged); {MERGE_HINT}')
    if state_dict is not None and refconv_prefixes(state_dict):
        raise ValueError('the checkpoint holds refocus_weight keys (unmerged RefConv); '
                         f'{MERGE_HINT}')


def _fix_scope(model_cfg: Config) -> Config:
    cfg = copy.deepcopy(model_cfg)
    from mmengine.registry import init_default_scope
    init_default_scope(codebase_of(cfg))
    return cfg


def export_onnx(model_cfg: Config, checkpoint: str, out: str, input_shape: Tuple[int, int],
                deploy_cfg: Optional[Config] = None, overwrite: bool = False) -> Config:
    """Export a plain (merged) checkpoint to ONNX with mmdeploy's ``torch2onnx``; returns the
    deploy config used. ``out`` is written atomically (temp dir beside it, then rename)."""
    from mmdeploy.apis import torch2onnx
    from .checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(checkpoint)
    check_deployable(model_cfg, ckpt.get('state_dict', ckpt))
    if osp.exists(out) and not overwrite:
        raise FileExistsError(f'{out!r} exists; pass --force (overwrite=True) to replace it')
    model_cfg = _fix_scope(model_cfg)
    deploy_cfg = deploy_cfg or deploy_config(codebase_of(model_cfg), input_shape)
    d = osp.dirname(osp.abspath(out))
    os.makedirs(d, exist_ok=True)
    work = tempfile.mkdtemp(prefix='.' + osp.basename(out) + '.', dir=d)
    try:
        with torchscript_onnx_export():
            torch2onnx(_example_image(input_shape), work, 'end2end.onnx', deploy_cfg, model_cfg,
                       checkpoint, device='cpu')
        os.replace(osp.join(work, 'end2end.onnx'), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return deploy_cfg


def _example_image(input_shape: Tuple[int, int], seed: int = 0) -> np.ndarray:
    h, w = input_shape
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def onnx_conv_report(path: str) -> dict:
    """Conv nodes of an ONNX graph: count, how many take a constant weight, op-type histogram."""
    import onnx
    model = onnx.load(path)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == 'Constant' for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == 'Conv']
    ops: Dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    return dict(input_shape=dims, conv_nodes=len(convs),
                const_weight_convs=sum(n.input[1] in consts for n in convs),
                ops=ops, initializer_shapes=sorted(tuple(i.dims) for i in model.graph.initializer))


def ort_session(path: str):
    """An ONNX Runtime CPU session (mmdeploy's custom ops registered where present)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    try:
        from mmdeploy.backend.onnxruntime.init_plugins import get_ops_path
        if get_ops_path():
            opts.register_custom_ops_library(get_ops_path())
    except Exception:  # noqa: BLE001 - plain convnets need no custom op
        pass
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


class _ConvCounter:
    """Counts 2-D conv calls of a PyTorch forward: what the exported graph must hold."""

    def __init__(self, model: nn.Module):
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.Conv2d)]

    def _hook(self, *_):
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _pytorch_run(model_cfg: Config, checkpoint: str, deploy_cfg: Config,
                 input_shape: Tuple[int, int]) -> Tuple[torch.Tensor, List[torch.Tensor], int]:
    """mmdeploy's rewritten forward of the checkpoint's model in PyTorch.

    Returns the input tensor, the outputs and the number of conv calls."""
    from mmdeploy.apis import build_task_processor
    from mmdeploy.core import RewriterContext, patch_model
    from mmdeploy.utils import IR
    model_cfg = _fix_scope(model_cfg)
    task = build_task_processor(model_cfg, deploy_cfg, 'cpu')
    model = task.build_pytorch_model(checkpoint).eval()
    data, inputs = task.create_input(_example_image(input_shape), input_shape,
                                     data_preprocessor=getattr(model, 'data_preprocessor', None))
    inputs = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    patched = patch_model(model, cfg=deploy_cfg, backend='onnxruntime', ir=IR.ONNX)
    counter = _ConvCounter(patched)
    try:
        with RewriterContext(cfg=deploy_cfg, backend='onnxruntime', ir=IR.ONNX,
                             opset=deploy_cfg.onnx_config.opset_version), torch.no_grad():
            out = patched(inputs, data_samples=data['data_samples'], mode='predict')
    finally:
        counter.remove()
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return inputs, outs, counter.calls


def _det_diff(ort_out: Sequence[np.ndarray], pt_out: Sequence[np.ndarray]) -> Tuple[float, float]:
    """Max difference of two detection sets, blind to the order of (near-)equal scores."""
    (od, ol), (pd, pl) = ort_out, pt_out
    diff, scale = 0.0, float(np.abs(pd).max()) if pd.size else 0.0
    for b in range(pd.shape[0]):
        if od[b].shape != pd[b].shape:
            return float('inf'), scale
        diff = max(diff, float(np.abs(np.sort(od[b, :, 4]) - np.sort(pd[b, :, 4])).max()))
        for i in range(od.shape[1]):
            # the PyTorch detection of the same label and nearest score and box
            same = pl[b] == ol[b, i]
            if not same.any():
                return float('inf'), scale
            cand = np.abs(pd[b][same] - od[b, i]).max(axis=1)
            diff = max(diff, float(cand.min()))
    return diff, scale


def compare_with_pytorch(onnx_path: str, model_cfg: Config, checkpoint: str, deploy_cfg: Config,
                         input_shape: Tuple[int, int]) -> dict:
    """Run ONNX Runtime and PyTorch (mmdeploy's rewritten forward) on the same input.

    Returns ``max_diff`` (max |ORT - PyTorch|; detections matched by label and nearest
    score/box), ``scale`` (max |PyTorch output|), ``torch_convs`` (conv calls of the PyTorch
    forward) and the ONNX graph's Conv report.
    """
    inputs, pt, convs = _pytorch_run(model_cfg, checkpoint, deploy_cfg, input_shape)
    sess = ort_session(onnx_path)
    ort_out = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})
    pt = [t.detach().cpu().numpy() for t in pt]
    if len(pt) != len(ort_out):
        raise RuntimeError(f'ONNX Runtime gave {len(ort_out)} outputs, PyTorch {len(pt)}')
    if codebase_of(model_cfg) == 'mmdet':
        diff, scale = _det_diff(ort_out, pt)
    else:
        diff = max(float(np.abs(o.astype(np.float64) - p).max()) for o, p in zip(ort_out, pt))
        scale = max(float(np.abs(p).max()) for p in pt)
    return dict(max_diff=diff, scale=scale, torch_convs=convs, input=inputs,
                **onnx_conv_report(onnx_path))


def ort_latency(path: str, inputs: np.ndarray, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of ``runs`` ONNX Runtime calls on ``inputs``."""
    sess = ort_session(path)
    feed = {sess.get_inputs()[0].name: inputs}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
