"""What RefConv costs per training step, and where the time goes: plain conv vs seed vs refconv_mm.

    python tools/benchmark/speed_memory.py [--models retinanet mobilenetv2] [--steps N]
        [--warmup N] [--eval-steps N] [--device cpu|cuda] [--out PATH]
        [--retinanet-size 512] [--retinanet-batch 2] [--mobilenetv2-size 224]
        [--mobilenetv2-batch 16] [--optimizer default|foreach|fused]
        [--amp] [--compile [--compile-backend inductor]]
    python tools/benchmark/speed_memory.py --ops [--rounds 8] [--top 25] [...]
    python tools/benchmark/speed_memory.py --transform-cost [--reps 7] [--speed-json RUN.json ...]

One tool, three views of the same models, variants and optimizer:

* default: training-step time, peak memory and eval-forward time, variants side by side;
* ``--ops``: per-op *self* time of a training step, every variant profiled in every round
  (rounds rotated as below, one untimed round first), summed per step over ``--rounds``: the
  total op time per variant and the ``--top`` ops that differ most between refconv_mm and plain,
  the seed beside them (the transform's ``bmm`` / ``addcmul`` / grouped conv, the optimizer's
  update over the refocusing weights, autograd's bookkeeping of the extra nodes);
* ``--transform-cost``: the refocusing transform alone, per trainable RefConv, without grad
  (forward) and with grad to the refocusing weights (what backward needs), medians over
  ``--reps``, summed per kernel size and grouping, per layer (hot) and in sequence (one pass
  over every layer, as a step runs them, cold); beside it the seed's cost (it refocuses on every
  call of a layer) and the optimizer extra (SGD over the refocusing weights minus SGD over
  basis-shaped weights). With ``--speed-json`` (results of the default view) each is given as a
  share of that run's plain step, beside refconv_mm's measured gap over plain.

Models (each built three times, from the same plain weights):

* ``retinanet``: mmdet ``retinanet/retinanet_r50_fpn_1x_coco.py`` (backbone ``init_cfg=None``),
  512x512 random images, batch 2, three random gt boxes per image, ``model.loss``.
* ``mobilenetv2``: mmdet ``MobileNetV2(out_indices=(7,))`` + global average pool +
  ``Linear(1280, 1000)`` + cross-entropy, 224x224, batch 16.

Variants: ``plain`` (``nn.Conv2d``), ``seed`` (the official code's layer, ``SeedRefConv`` below:
autograd through ``convmap`` on every call) and ``refconv_mm`` (``conv_cfg=dict(type='RefConv')``
on the backbone, and on the neck and bbox head of RetinaNet). ``seed`` and ``refconv_mm`` replace
exactly the same convs (checked) and load the plain model's state dict; ``refconv_mm`` gets the
seed's (Kaiming-initialised) ``convmap`` weights as its ``refocus_weight`` so both compute the same
kernels. Eval additionally times ``merged`` (``refconv_mm.merge_refconv`` on a copy).

Correctness checks run before timing and abort the run if they fail: the state dicts load with
only the refocusing weights missing; seed and refconv_mm give the same training loss (1e-4
relative) and refocusing gradients (1e-3 relative, in norm) in fp32, or, where the network
amplifies fp32 rounding beyond that, 1e-9 / 1e-6 in float64 (on copies); the merged model's eval output equals
the unmerged one (1e-4 relative to the output's max abs).

Timing: ``--warmup`` untimed steps, then ``--steps`` timed ones, variants interleaved round-robin
so machine noise hits all alike, each round starting one variant later (plain, seed, refconv_mm;
seed, refconv_mm, plain; ...) so that no variant always follows the same one; the MEDIAN is
reported, and beside it the paired ratio: the median over rounds of a variant's step over
plain's (and refconv_mm's over the seed's) in the same round, which cancels drift that moves
whole rounds. A
training step is ``zero_grad`` + forward + backward + SGD step (momentum 0.9, weight decay 1e-4;
``--optimizer`` picks torch's SGD implementation, the same for every variant: ``fused`` by default,
as an mmengine config gets with ``optim_wrapper=dict(optimizer=dict(type='SGD', ..., fused=True))``;
``default`` is torch's per-parameter loop on CPU, which costs RefConv's extra parameters twice).
On CUDA every timed region ends with ``torch.cuda.synchronize()``. Each timed training step also
records the process's minor page faults (``getrusage`` ``ru_minflt``, where the platform has it;
reported as the mean per step, since they come in bursts): on CPU a step pays for every page the
allocator maps afresh, so variants that run the same ops can differ by how much memory they hand
back to the OS and fault in again.

Peak memory (one extra, untimed step per variant, after the timed ones so optimizer state
exists): the peak of live tensor memory during a training step, i.e.

    static bytes live at step start  (unique storages of parameters, buffers, grads and
                                      optimizer state)
  + max(0, maximum over the step of the running sum of allocated-minus-freed bytes).

On CPU the running sum comes from ``torch.profiler`` with ``profile_memory=True``: every tensor
allocation and free is a ``[memory]`` event in the kineto results (``nbytes()`` positive for an
allocation, negative for a free); they are sorted by timestamp and summed. Memory that never is a
tensor storage (e.g. oneDNN scratchpads) is not seen. The method is self-checked on allocations of
known size before the benchmark (the run fails loudly if it is off). On CUDA the increase is
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the step, after
``torch.cuda.reset_peak_memory_stats()``. The profiler does not report frees of blocks allocated
before profiling started, so the measured step must free nothing that existed at its start: its
``zero_grad(set_to_none=True)`` runs just before the profiled region (static bytes are taken after
it, so grads count 0 there and are counted where backward allocates them, in the increase).

Eval forward: ``model.eval()``, ``torch.no_grad()``; RetinaNet runs ``mode='tensor'`` (backbone,
neck and head, no box post-processing, which does not depend on the convs).

Training switches. ``--amp``: every variant's forward (training and eval) runs under
``torch.autocast`` (bf16 on a CPU, fp16 on CUDA: what mmengine's ``AmpOptimWrapper`` uses),
backward and the optimizer outside it, as mmengine runs them; the checks then also require the
merged model's eval output to equal the unmerged one's exactly. ``--compile``: adds
``plain+compile`` and ``refconv_mm+compile``, copies of ``plain`` and ``refconv_mm`` whose forward
and loss run through ``torch.compile`` (``--compile-backend``, inductor by default; backward
through the compiled graph, the optimizer step eager), timed in the same rounds as the eager
variants; the first (compiling) call is timed apart, from empty dynamo caches, and its graph
breaks and graphs counted (the warm-up rounds then compile the earlier variants again).

Prints progress, a Markdown table with the targets this script can check (refconv_mm's training
step no slower than the seed's, on medians and paired; peak memory no worse than docs/benchmarks.md's
figures, 1.12x plain on RetinaNet and 1.30x on MobileNetV2; eval unmerged <= 1.20x; merged equal
to plain within noise), and writes everything as JSON to ``--out``. The remaining target, the
train ratio within the refocusing share + 1 pp, needs the transform's cost:
``--transform-cost --speed-json`` prints it beside this view's JSON.

On a machine without a GPU the profiler's probe for one fails with an ERROR line and logs its
stages; :func:`quiet_profiler` silences kineto's log there (``KINETO_LOG_LEVEL``, unless set).
"""
import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import os.path as osp
import platform
try:
    import resource
except ImportError:  # not on Windows: page faults are then not counted
    resource = None
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from torch.nn.modules.utils import _pair

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, ROOT)

from refconv_mm import RefConv2d, merge_refconv  # noqa: E402
from refconv_mm.experiments.timing import paired_ratios, rotated  # noqa: E402
from refconv_mm.refocus import refocus_kernel  # noqa: E402

TRAIN_VARIANTS = ('plain', 'seed', 'refconv_mm')
EVAL_VARIANTS = ('plain', 'seed', 'refconv_mm', 'merged')
# Peak memory x plain must not get worse than docs/benchmarks.md's (the frozen basis and the refocusing
# weights' gradient and momentum are the floor).
MEMORY_TARGETS = {'retinanet': 1.12, 'mobilenetv2': 1.30}
# The unmerged model computes every kernel on every no-grad call (so no write, EMA's .data swaps
# included, leaves it stale): 1.19x plain measured on MobileNetV2, whose depthwise transforms
# mix all channels' kernels (docs/training_switches.md). The merged model pays nothing.
EVAL_UNMERGED_TARGET = 1.20
MERGED_MIN_NOISE = 0.01  # merged == plain "within noise": at least 1 %, or plain's IQR/median
DEFAULT_STEPS = {'retinanet': 5, 'mobilenetv2': 10}
MIB = 2**20
OPTIMIZER_IMPLS = ('default', 'foreach', 'fused')
DEFAULT_OPTIMIZER = 'fused'  # one pass per parameter: 2.3x faster than the loop on 41 M
CONV_CFG = {'plain': None, 'seed': dict(type='SeedRefConv'), 'refconv_mm': dict(type='RefConv')}


def log(msg: str) -> None:
    """Print a progress line immediately."""
    print(msg, flush=True)


# -- the seed formulation ----------------------------------------------------------
@MODELS.register_module('SeedRefConv')
class SeedRefConv(nn.Module):
    """The official code's ``RepConv``, extended only to take ConvModule/ResNet arguments.

    The basis is a buffer ``weight`` (and ``bias``, if any); ``convmap`` is a conv over the
    kernels viewed as a ``(1, N, k, k)`` image with ``Cin*Cout/g^2`` groups, and every forward
    computes ``weight + convmap(weight)`` under autograd (no caching), exactly as the seed does.
    ``map_k`` is capped at the kernel size (a 1x1 conv gets a 1x1 map).
    """

    transposed = False  # read by ConvModule
    output_padding = (0, 0)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, map_k: int = 3) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        assert kh == kw, 'the seed formulation handles square kernels only'
        map_k = min(map_k, kh)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.origin_kernel_shape = (out_channels, in_channels // groups, kh, kh)
        self.register_buffer('weight', torch.zeros(*self.origin_kernel_shape))
        self.register_buffer('bias', torch.zeros(out_channels) if bias else None)
        G = in_channels * out_channels // (groups**2)
        self.num_2d_kernels = out_channels * in_channels // groups
        self.convmap = nn.Conv2d(self.num_2d_kernels, self.num_2d_kernels, map_k, 1, map_k // 2,
                                 groups=G, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        origin_weight = self.weight.view(1, self.num_2d_kernels, k, k)
        kernel = self.weight + self.convmap(origin_weight).view(*self.origin_kernel_shape)
        return F.conv2d(inputs, kernel, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups, bias=self.bias)


# -- models --------------------------------------------------------------------------
@dataclass
class Bench:
    """How to build, feed and run one benchmarked model."""
    name: str
    build: Callable[[Optional[dict]], nn.Module]  # conv_cfg -> model on CPU
    make_batch: Callable[[torch.device], Any]
    train_loss: Callable[[nn.Module, Any], torch.Tensor]
    eval_forward: Callable[[nn.Module, Any], Any]
    lr: float
    desc: str


def retinanet_bench(size: int, batch: int) -> Bench:
    """RetinaNet-R50-FPN from mmdet's installed config, random images and gt boxes."""
    import mmdet
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.structures import InstanceData
    register_all_modules(init_default_scope=True)
    # The installed mmdet's .mim copy of 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'.
    base = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'retinanet',
                                    'retinanet_r50_fpn_1x_coco.py')).model
    base.backbone.init_cfg = None  # no pretrained download

    def build(conv_cfg: Optional[dict]) -> nn.Module:
        cfg = copy.deepcopy(base)
        if conv_cfg is not None:
            for part in ('backbone', 'neck', 'bbox_head'):
                cfg[part].conv_cfg = dict(conv_cfg)
        return DET_MODELS.build(cfg)

    def make_batch(device: torch.device) -> Tuple[torch.Tensor, list]:
        g = torch.Generator().manual_seed(0)
        inputs = torch.randn(batch, 3, size, size, generator=g)
        samples = []
        for _ in range(batch):
            n = 3
            xy = torch.rand(n, 2, generator=g) * 0.6 * size
            wh = (0.1 + 0.3 * torch.rand(n, 2, generator=g)) * size
            gt = InstanceData()
            gt.bboxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1).to(device)
            gt.labels = torch.randint(0, 80, (n, ), generator=g).to(device)
            shape = (size, size)
            s = DetDataSample(metainfo=dict(img_shape=shape, pad_shape=shape, ori_shape=shape,
                                            batch_input_shape=shape, scale_factor=(1.0, 1.0)))
            s.gt_instances = gt
            samples.append(s)
        return inputs.to(device), samples

    def train_loss(model: nn.Module, data) -> torch.Tensor:
        loss, _ = model.parse_losses(model.loss(*data))
        return loss

    def eval_forward(model: nn.Module, data) -> Any:
        return model(data[0], mode='tensor')

    return Bench('retinanet', build, make_batch, train_loss, eval_forward, lr=0.01,
                 desc=f'RetinaNet-R50-FPN {size}x{size} batch {batch}')


class MobileNetV2Classifier(nn.Module):
    """mmdet MobileNetV2 (last stage, 1280 channels) + global average pool + linear classifier."""

    def __init__(self, conv_cfg: Optional[dict] = None, num_classes: int = 1000) -> None:
        super().__init__()
        from mmdet.models.backbones import MobileNetV2
        self.backbone = MobileNetV2(out_indices=(7, ), conv_cfg=conv_cfg)
        self.head = nn.Linear(1280, num_classes)

    def init_weights(self) -> None:
        """Initialise the backbone as mmdet does (the linear head keeps torch's default)."""
        self.backbone.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0].mean((2, 3)))


def mobilenetv2_bench(size: int, batch: int) -> Bench:
    """Depthwise-heavy classifier: MobileNetV2 + linear head, cross-entropy on random labels."""
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    def make_batch(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        return x.to(device), torch.randint(0, 1000, (batch, ), generator=g).to(device)

    def train_loss(model: nn.Module, data) -> torch.Tensor:
        return F.cross_entropy(model(data[0]), data[1])

    def eval_forward(model: nn.Module, data) -> Any:
        return model(data[0])

    return Bench('mobilenetv2', MobileNetV2Classifier, make_batch, train_loss, eval_forward,
                 lr=0.01, desc=f'MobileNetV2 classifier {size}x{size} batch {batch}')


# -- memory --------------------------------------------------------------------------
_CPU_MEM_DEVICES = ('DeviceType.CPU', 'DeviceType.MKLDNN', 'DeviceType.IDEEP')


BENCH_SIZES = {'retinanet': (512, 2), 'mobilenetv2': (224, 16)}  # (image size, batch)


def make_bench(name: str, size: Optional[int] = None, batch: Optional[int] = None) -> Bench:
    """The benchmark ``name`` (``retinanet``, ``mobilenetv2``); size and batch default to
    :data:`BENCH_SIZES`, the sizes every figure in docs/benchmarks.md uses."""
    default_size, default_batch = BENCH_SIZES[name]
    build = {'retinanet': retinanet_bench, 'mobilenetv2': mobilenetv2_bench}[name]
    return build(size or default_size, batch or default_batch)


def add_bench_size_args(parser: argparse.ArgumentParser) -> None:
    """``--{model}-size`` / ``--{model}-batch`` for every benchmark, :data:`BENCH_SIZES` default."""
    for name, (size, batch) in BENCH_SIZES.items():
        parser.add_argument(f'--{name}-size', type=int, default=size)
        parser.add_argument(f'--{name}-batch', type=int, default=batch)


def bench_from_args(name: str, args: argparse.Namespace) -> Bench:
    """:func:`make_bench` at the sizes given by :func:`add_bench_size_args`' options."""
    return make_bench(name, getattr(args, f'{name}_size'), getattr(args, f'{name}_batch'))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_increase_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Maximum increase of allocated tensor memory on ``device`` while ``fn()`` runs.

    CPU: running sum of the profiler's ``[memory]`` events (allocations > 0, frees < 0) in time
    order. CUDA: ``max_memory_allocated`` minus the allocation at the start.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(getattr(prof, 'profiler', None), 'kineto_results', None)
    if results is None:
        raise RuntimeError('torch.profiler gave no kineto results; cannot measure CPU memory')
    events = [(e.start_ns(), i, e.nbytes()) for i, e in enumerate(results.events())
              if e.name() == '[memory]' and str(e.device_type()) in _CPU_MEM_DEVICES]
    running = peak = 0
    for _, _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def memory_self_check(device: torch.device) -> Dict[str, int]:
    """Check :func:`peak_increase_bytes` on allocations of known size; raise if it is off."""
    mib_floats = MIB // 4

    def toy() -> None:
        a = torch.ones(4 * mib_floats, device=device)  # 4 MiB
        b = torch.ones(2 * mib_floats, device=device)  # 6 MiB live: the peak
        del a
        c = torch.ones(1 * mib_floats, device=device)  # 3 MiB live
        del b, c

    expected = 6 * MIB
    measured = peak_increase_bytes(toy, device)
    # A few KiB of incidental allocations are allowed, a MiB-sized error is not.
    if abs(measured - expected) > 64 * 1024:
        raise RuntimeError(f'memory self-check FAILED: measured peak {measured} B, expected '
                           f'{expected} B; the profiler memory method is not reliable here')
    return {'expected_bytes': expected, 'measured_bytes': measured}


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or t.device.type == 'meta':
            continue
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes of unique storages of parameters + buffers, grads and optimizer state."""
    seen: set = set()
    params = _storage_bytes(list(model.parameters()) + list(model.buffers()), seen)
    grads = _storage_bytes((p.grad for p in model.parameters()), seen)
    state = _storage_bytes((v for s in optimizer.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor)), seen)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {'params_buffers': params, 'grads': grads, 'optimizer_state': state,
            'total': params + grads + state, 'trainable_param_bytes': trainable}


# -- steps ---------------------------------------------------------------------------
@dataclass
class Variant:
    """One model variant with its optimizer, and how its forward runs (autocast, compiled)."""
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    amp: Optional[torch.dtype] = None  # autocast dtype of the forward, None: fp32
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None  # data -> loss (compiled variants)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype ``--amp`` uses: what CPU autocast supports, fp16 on a GPU."""
    return torch.bfloat16 if device.type == 'cpu' else torch.float16


def forward_context(v: Variant, device: torch.device):
    """``torch.autocast`` for an AMP variant's forward, else a no-op context."""
    if v.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=v.amp)


def make_optimizer(model: nn.Module, lr: float, impl: str = DEFAULT_OPTIMIZER
                   ) -> torch.optim.Optimizer:
    """SGD, momentum 0.9, weight decay 1e-4, over the trainable parameters.

    ``impl``: ``default`` (torch's choice: a per-parameter loop on CPU, foreach on CUDA),
    ``foreach`` (multi-tensor ops) or ``fused`` (one kernel per parameter doing decay, momentum
    and update in one pass). Every variant of a run gets the same ``impl``.
    """
    kwargs = {'default': {}, 'foreach': {'foreach': True}, 'fused': {'fused': True}}[impl]
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                           momentum=0.9, weight_decay=1e-4, **kwargs)


def optimizer_desc(optimizer: torch.optim.Optimizer) -> str:
    """``SGD(lr, momentum, weight_decay, foreach, fused)`` of the first param group."""
    g = optimizer.param_groups[0]
    return (f'{type(optimizer).__name__}(lr={g["lr"]}, momentum={g["momentum"]}, '
            f'weight_decay={g["weight_decay"]}, foreach={g.get("foreach")}, '
            f'fused={g.get("fused")})')


def train_step(bench: Bench, v: Variant, data, zero_grad: bool = True) -> float:
    """One training step (zero_grad, forward, backward, SGD step); returns the loss."""
    if zero_grad:
        v.optimizer.zero_grad(set_to_none=True)
    with forward_context(v, next(v.model.parameters()).device):
        loss = v.loss_fn(data) if v.loss_fn else bench.train_loss(v.model, data)
    loss.backward()
    v.optimizer.step()
    return loss.item()


def timed(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """Wall time of ``fn()`` in seconds (device-synchronised) and its result."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (``None`` where ``getrusage`` is missing)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_robin(names: Sequence[str], warmup: int, steps: int,
                run: Callable[[str], Tuple[float, Any]], label: str) -> Dict[str, List[float]]:
    """Run ``warmup`` then ``steps`` rounds over ``names``; the timed seconds per name.

    Round ``i`` starts at ``names[i % len(names)]`` (a rotation): a step pays for some of the
    state its predecessor leaves (freed heap, evicted caches), so a fixed order would always
    charge the same variant for the same neighbour.
    """
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        tag = f'warmup {i + 1}/{warmup}' if i < warmup else f'step {i - warmup + 1}/{steps}'
        parts = []
        for n in rotated(names, i):
            dt, extra = run(n)
            if i >= warmup:
                times[n].append(dt)
            parts.append(f'{n} {dt:.3f}s' + (f' (loss {extra:.4f})' if extra is not None else ''))
        log(f'  [{label}] {tag}: ' + ', '.join(parts))
    return times


def _flat_tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return []


def _rel_max_diff(a: Any, b: Any) -> float:
    ta, tb = _flat_tensors(a), _flat_tensors(b)
    assert len(ta) == len(tb) and ta, 'outputs have different structure'
    diff = max((x.double() - y.double()).abs().max().item() for x, y in zip(ta, tb))
    scale = max(x.double().abs().max().item() for x in ta)
    return diff / max(scale, 1e-12)


# -- checks --------------------------------------------------------------------------
def refocus_layers(model: nn.Module, cls: type) -> Dict[str, nn.Module]:
    """Name -> module of every ``cls`` layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def build_variants(bench: Bench, device: torch.device, optimizer: str = DEFAULT_OPTIMIZER,
                   amp: bool = False, compile_backend: Optional[str] = None
                   ) -> Tuple[Dict[str, Variant], dict]:
    """Build plain / seed / refconv_mm from the same plain weights; check coverage, loading.

    ``amp``: every variant's forward runs under autocast (:func:`amp_dtype`).
    ``compile_backend``: also ``plain+compile`` and ``refconv_mm+compile`` (copies, same weights).
    """
    torch.manual_seed(0)
    plain = bench.build(None)
    plain.init_weights()
    state = plain.state_dict()
    torch.manual_seed(1)  # seed convmap: torch's default (Kaiming-uniform) init
    seed = bench.build(CONV_CFG['seed'])
    refconv = bench.build(CONV_CFG['refconv_mm'])
    info: Dict[str, Any] = {}
    for name, model, extra_key in (('seed', seed, 'convmap.weight'),
                                   ('refconv_mm', refconv, 'refocus_weight')):
        res = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in res.missing_keys if not k.endswith(extra_key)]
        if bad_missing or res.unexpected_keys:
            raise RuntimeError(f'{name}: plain state dict does not load cleanly: missing '
                               f'{bad_missing[:5]}, unexpected {res.unexpected_keys[:5]}')
        info[f'{name}_missing_keys'] = len(res.missing_keys)
    seed_layers = refocus_layers(seed, SeedRefConv)
    ref_layers = refocus_layers(refconv, RefConv2d)
    if sorted(seed_layers) != sorted(ref_layers) or not ref_layers:
        raise RuntimeError('seed and refconv_mm do not replace the same convs: '
                           f'{sorted(set(seed_layers) ^ set(ref_layers))[:10]}')
    with torch.no_grad():  # same refocusing weights -> the same kernels in both
        for n, layer in ref_layers.items():
            layer.refocus_weight.copy_(seed_layers[n].convmap.weight)
    info['refocused_convs'] = len(ref_layers)
    info['plain_convs'] = sum(isinstance(m, nn.Conv2d) and not isinstance(m, RefConv2d)
                              for m in refconv.modules())
    variants = {}
    dtype = amp_dtype(device) if amp else None
    for name, model in (('plain', plain), ('seed', seed), ('refconv_mm', refconv)):
        model.to(device).train()
        variants[name] = Variant(name, model, make_optimizer(model, bench.lr, optimizer), dtype)
        info[f'{name}_trainable_params'] = sum(p.numel() for p in model.parameters()
                                               if p.requires_grad)
    if compile_backend:
        for base in ('plain', 'refconv_mm'):
            model = copy.deepcopy(variants[base].model)
            loss_fn = torch.compile(lambda data, m=model: bench.train_loss(m, data),
                                    backend=compile_backend)
            variants[base + '+compile'] = Variant(
                base + '+compile', model, make_optimizer(model, bench.lr, optimizer), dtype,
                loss_fn)
    return variants, info


def _as_dtype(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with its floating tensors (also inside lists, tuples, mmengine data elements) cast."""
    from mmengine.structures import BaseDataElement
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_dtype(o, dtype) for o in obj)
    if isinstance(obj, BaseDataElement):
        new = obj.clone()
        for k, v in obj.items():
            setattr(new, k, _as_dtype(v, dtype))
        return new
    return obj


def _compare_seed_refconv(bench: Bench, variants: Dict[str, Variant], data,
                          dtype: torch.dtype) -> Tuple[float, float, Dict[str, float]]:
    """Relative loss and refocusing-gradient differences of seed vs refconv_mm, on copies.

    Two passes: in the first, refconv_mm computes a kernel per call; from the second on, a
    layer called several times per step (RetinaNet's head) shares one. The worst is returned.
    """
    seed, ref = (copy.deepcopy(variants[n].model).to(dtype) for n in ('seed', 'refconv_mm'))
    data = _as_dtype(data, dtype)
    seed_layers = refocus_layers(seed, SeedRefConv)
    rel = grad_rel = 0.0
    for _ in range(2):
        losses = {}
        for name, model in (('seed', seed), ('refconv_mm', ref)):
            model.zero_grad(set_to_none=True)
            loss = bench.train_loss(model, data)
            loss.backward()
            losses[name] = loss.item()
        rel = max(rel, abs(losses['seed'] - losses['refconv_mm']) / max(abs(losses['seed']),
                                                                      1e-12))
        num = den = 0.0
        for n, layer in refocus_layers(ref, RefConv2d).items():
            gs, gr = seed_layers[n].convmap.weight.grad, layer.refocus_weight.grad
            if (gs is None) != (gr is None):
                raise RuntimeError(f'{n}: refocusing grad present in one variant only')
            if gs is not None:
                num += (gs.double() - gr.double()).pow(2).sum().item()
                den += gs.double().pow(2).sum().item()
        grad_rel = max(grad_rel, (num / max(den, 1e-30))**0.5)
    return rel, grad_rel, losses


def check_seed_vs_refconv(bench: Bench, variants: Dict[str, Variant], data) -> dict:
    """Same training loss and refocusing gradients for seed and refconv_mm.

    fp32 first (loss 1e-4 relative, gradients 1e-3 relative in norm). The two compute the
    refocused kernel with different, equally exact algorithms, and a deep random-init network
    can amplify their fp32 rounding differences to ~1% in its gradients (MobileNetV2 does);
    then the check is repeated in float64, where it must hold to 1e-9 / 1e-6.
    """
    rel, grad_rel, losses = _compare_seed_refconv(bench, variants, data, torch.float32)
    out = {'loss_seed': losses['seed'], 'loss_refconv_mm': losses['refconv_mm'],
           'loss_rel_diff': rel, 'refocus_grad_rel_diff': grad_rel, 'checked_in': 'float32'}
    if rel <= 1e-4 and grad_rel <= 1e-3:
        return out
    rel64, grad_rel64, _ = _compare_seed_refconv(bench, variants, data, torch.float64)
    if not (rel64 <= 1e-9 and grad_rel64 <= 1e-6):
        raise RuntimeError(f'seed vs refconv_mm differ: loss rel {rel:.2e} / grads rel '
                           f'{grad_rel:.2e} in float32, {rel64:.2e} / {grad_rel64:.2e} in float64')
    out.update(loss_rel_diff_f64=rel64, refocus_grad_rel_diff_f64=grad_rel64,
               checked_in='float64')
    return out


# -- per-model benchmark ---------------------------------------------------------------
def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _iqr_rel(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) / _median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / _median(xs)


def run_model(bench: Bench, args: argparse.Namespace, device: torch.device) -> dict:
    """Checks, training timing, peak memory and eval timing for one model's variants."""
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every param
    steps = args.steps or DEFAULT_STEPS[bench.name]
    eval_steps = args.eval_steps or steps
    log(f'\n== {bench.name}: {bench.desc}; warmup {args.warmup}, steps {steps}, eval steps '
        f'{eval_steps}, device {device}, threads {torch.get_num_threads()}')
    t0 = time.perf_counter()
    variants, info = build_variants(bench, device, args.optimizer, args.amp,
                                    args.compile_backend if args.compile else None)
    train_names = tuple(variants)  # TRAIN_VARIANTS, then the compiled ones
    info['optimizer'] = {n: optimizer_desc(v.optimizer) for n, v in variants.items()}
    data = bench.make_batch(device)
    log(f'  built in {time.perf_counter() - t0:.1f}s: {info}')
    checks = check_seed_vs_refconv(bench, variants, data)
    log(f'  check seed vs refconv_mm: loss {checks["loss_seed"]:.6f} vs '
        f'{checks["loss_refconv_mm"]:.6f} (rel {checks["loss_rel_diff"]:.1e}), refocus grads '
        f'rel {checks["refocus_grad_rel_diff"]:.1e}' + (
            '' if checks['checked_in'] == 'float32' else
            f'; float64: loss rel {checks["loss_rel_diff_f64"]:.1e}, refocus grads rel '
            f'{checks["refocus_grad_rel_diff_f64"]:.1e}') + ': ok')

    compiled = [n for n in train_names if variants[n].loss_fn is not None]
    if compiled:
        info['compile'] = compile_first_steps(bench, variants, compiled, data, device)
    train_faults: Dict[str, List[int]] = {n: [] for n in train_names}

    def train_one(name: str) -> Tuple[float, Any]:
        before = minor_faults()
        out = timed(lambda: train_step(bench, variants[name], data), device)
        if before is not None:
            train_faults[name].append(minor_faults() - before)
        return out

    train_times = round_robin(train_names, args.warmup, steps, train_one, 'train')
    # the warm-up steps come first: keep the timed steps' counts only
    train_faults = {n: f[args.warmup:] for n, f in train_faults.items()}
    if all(train_faults.values()):
        # bursty (glibc trims in some steps only), so the mean, not the median
        log('  minor page faults per train step (mean): ' + ', '.join(
            f'{n} {statistics.mean(f):.0f}' for n, f in train_faults.items()))
    # Layers called several times per step (RetinaNet's head, once per FPN level): the seed
    # refocuses per call, refconv_mm once per step.
    calls = [m._calls_per_step for m in refocus_layers(variants['refconv_mm'].model,
                                                       RefConv2d).values()]
    info['refconv_layers_by_calls_per_step'] = {c: calls.count(c) for c in sorted(set(calls))}
    log(f'  refconv_mm layers by calls per step: {info["refconv_layers_by_calls_per_step"]}')

    memory = {}
    for name in train_names:
        v = variants[name]
        v.optimizer.zero_grad(set_to_none=True)  # the profiler cannot see frees of older blocks
        gc.collect()
        static = static_bytes(v.model, v.optimizer)
        inc = peak_increase_bytes(lambda: train_step(bench, v, data, zero_grad=False), device)
        memory[name] = {**static, 'step_increase': inc, 'peak': static['total'] + inc}
        log(f'  [memory] {name}: peak {memory[name]["peak"] / MIB:.1f} MiB = static '
            f'{static["total"] / MIB:.1f} (params+buffers {static["params_buffers"] / MIB:.1f}, '
            f'grads {static["grads"] / MIB:.1f}, optimizer {static["optimizer_state"] / MIB:.1f})'
            f' + step increase {inc / MIB:.1f} (incl. grads of '
            f'{static["trainable_param_bytes"] / MIB:.1f} trainable)')

    # Eval: merged copy of the (trained) refconv_mm model, checked against the unmerged one.
    models = {n: variants[n].model.eval() for n in EVAL_VARIANTS if n in variants}
    models['merged'] = merge_refconv(copy.deepcopy(models['refconv_mm'])).eval()
    if refocus_layers(models['merged'], RefConv2d):
        raise RuntimeError('merge_refconv left RefConv layers in the model')
    ctx = forward_context(variants['plain'], device)
    with torch.no_grad(), ctx:
        merge_rel = _rel_max_diff(bench.eval_forward(models['merged'], data),
                                  bench.eval_forward(models['refconv_mm'], data))
    # Under AMP the contract is bit for bit (the kernel is computed in fp32, then cast).
    if not merge_rel <= (0.0 if args.amp else 1e-4):
        raise RuntimeError(f'merged eval output differs from unmerged: rel {merge_rel:.2e}')
    checks['merged_vs_unmerged_rel_diff'] = merge_rel
    log(f'  check merged vs unmerged eval output: rel max diff {merge_rel:.1e}: ok')

    def eval_one(name: str) -> Tuple[float, Any]:
        with torch.no_grad(), forward_context(variants['plain'], device):
            dt, _ = timed(lambda: bench.eval_forward(models[name], data), device)
        return dt, None

    eval_times = round_robin(EVAL_VARIANTS, args.warmup, eval_steps, eval_one, 'eval')
    result = {
        'desc': bench.desc, 'steps': steps, 'eval_steps': eval_steps, 'warmup': args.warmup,
        'info': info, 'checks': checks, 'train_times_s': train_times,
        'train_minor_faults': train_faults, 'memory_bytes': memory,
        'eval_times_s': eval_times,
        'runtime_s': time.perf_counter() - t0,
    }
    del variants, models
    gc.collect()
    return result


def compile_first_steps(bench: Bench, variants: Dict[str, Variant], names: Sequence[str], data,
                        device: torch.device) -> Dict[str, dict]:
    """Run each compiled variant's first (compiling) step; its time, graph breaks and graphs.

    Dynamo's caches are emptied before each, so a variant's counts include the frames it shares
    with the one compiled before it (mmdet's loss code); the warm-up rounds compile them again.
    """
    from torch._dynamo.utils import counters
    out = {}
    for name in names:
        torch._dynamo.reset()
        counters.clear()
        dt, loss = timed(lambda: train_step(bench, variants[name], data), device)
        breaks = sum(counters['graph_break'].values())
        out[name] = dict(first_step_s=dt, graph_breaks=breaks,
                         graphs=counters['stats']['unique_graphs'],
                         break_reasons=sorted(counters['graph_break'])[:20])
        log(f'  [compile] {name}: first step {dt:.1f}s (loss {loss:.4f}), '
            f'{out[name]["graphs"]} graphs, {breaks} graph breaks')
    return out


# -- --ops: per-op self time, variants interleaved -----------------------------------------
def quiet_profiler() -> None:
    """Silence kineto's log where there is no GPU: its probe for one fails with an ERROR line."""
    if not torch.cuda.is_available():
        os.environ.setdefault('KINETO_LOG_LEVEL', '6')  # above USDT, kineto's highest level


def op_times(bench: Bench, variants: Dict[str, Variant], data, rounds: int,
             device: torch.device) -> Dict[str, dict]:
    """``{variant: {'ops_ms': {op: ms/step}, 'calls': {op: calls/step}, 'walls_s': [s]}}``."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    attr = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    steps: Dict[str, list] = {n: [] for n in TRAIN_VARIANTS}  # per step: {op: (ms, calls)}

    def run(name: str) -> Tuple[float, Any]:
        with profile(activities=acts) as prof:
            out = timed(lambda: train_step(bench, variants[name], data), device)
        steps[name].append({e.key: (getattr(e, attr) / 1e3, e.count)
                            for e in prof.key_averages()})
        return out
    walls = round_robin(TRAIN_VARIANTS, 1, rounds, run, 'ops')
    res = {}
    for name, per_step in steps.items():
        ops: Dict[str, float] = {}
        calls: Dict[str, float] = {}
        for step in per_step[1:]:  # the first is the warm-up round's
            for key, (ms, count) in step.items():
                ops[key] = ops.get(key, 0.0) + ms / rounds
                calls[key] = calls.get(key, 0.0) + count / rounds
        res[name] = {'ops_ms': ops, 'calls': calls, 'walls_s': walls[name]}
    return res


def ops_report(name: str, res: Dict[str, dict], top: int) -> str:
    """The totals and the ``top`` ops that differ most between refconv_mm and plain, as text."""
    ops = {n: res[n]['ops_ms'] for n in TRAIN_VARIANTS}
    lines = [f'{name}: step wall (median, profiled) ' + ', '.join(
        f'{n} {_median(res[n]["walls_s"]):.3f}s' for n in TRAIN_VARIANTS),
        '  op self time per step (ms): ' + ', '.join(
            f'{n} {sum(ops[n].values()):.1f}' for n in TRAIN_VARIANTS)]
    keys = set().union(*ops.values())
    diff = sorted(keys, key=lambda k: -abs(ops['refconv_mm'].get(k, 0) - ops['plain'].get(k, 0)))
    lines.append(f'  {"op":44s} {"plain":>8s} {"seed":>8s} {"refconv_mm":>10s} '
                 f'{"ref-plain":>9s} {"ref-seed":>9s}  calls plain/seed/ref')
    for k in diff[:top]:
        p, s, r = (ops[n].get(k, 0.0) for n in TRAIN_VARIANTS)
        calls = '/'.join(f'{res[n]["calls"].get(k, 0):.0f}' for n in TRAIN_VARIANTS)
        lines.append(f'  {k[:44]:44s} {p:8.1f} {s:8.1f} {r:10.1f} {r - p:+9.1f} {r - s:+9.1f}  '
                     f'{calls}')
    return '\n'.join(lines)


def run_ops(bench: Bench, args: argparse.Namespace, device: torch.device) -> dict:
    """The ``--ops`` view of one model."""
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    log(f'\n== {bench.name}: {bench.desc}, {args.rounds} profiled rounds, device {device}')
    variants, _ = build_variants(bench, device, args.optimizer, args.amp)
    res = op_times(bench, variants, bench.make_batch(device), args.rounds, device)
    log(ops_report(bench.name, res, args.top))
    return res


# -- --transform-cost: the refocusing transform alone ------------------------------------
def calls_per_step(bench: Bench, model: nn.Module, layers: List[RefConv2d]) -> Dict[nn.Module, int]:
    """How many times one training forward of ``model`` calls each layer."""
    counts = {m: 0 for m in layers}

    def count(module, inputs, output):
        counts[module] += 1
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            bench.train_loss(model.train(), bench.make_batch(torch.device('cpu')))
    finally:
        for h in handles:
            h.remove()
    return counts


def layer_costs(layers: List[RefConv2d], reps: int, calls: Dict[nn.Module, int]) -> Dict[tuple, list]:
    """``{(kernel size, grouped): [layers, fwd s, fwd+grad s, seed s per step]}``, per-layer
    medians (hot); the seed refocuses on each of the layer's ``calls``."""
    out: Dict[tuple, list] = {}
    for m in layers:
        basis = m.weight.detach()
        r = m.refocus_weight.detach().clone().requires_grad_()
        fwd, both = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                refocus_kernel(basis, r)
            t1 = time.perf_counter()
            k = refocus_kernel(basis, r)
            torch.autograd.grad(k, r, torch.ones_like(k))
            both.append(time.perf_counter() - t1)
            fwd.append(t1 - t0)
        row = out.setdefault((tuple(basis.shape[2:]), m.groups > 1), [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += _median(fwd)
        row[2] += _median(both)
        row[3] += calls[m] * _median(both)
    return out


def sequence_cost(layers: List[RefConv2d], reps: int) -> float:
    """Median seconds of one pass doing every layer's per-step refocusing work in turn."""
    items = [(m.weight.detach(), m.refocus_weight.detach().clone().requires_grad_(),
              m.groups > 1) for m in layers]
    totals = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for basis, r, grouped in items:
            if not grouped:  # g=1: the no-grad forward, then recompute + gradient in backward
                with torch.no_grad():
                    refocus_kernel(basis, r)
            k = refocus_kernel(basis, r)
            torch.autograd.grad(k, r, torch.ones_like(k))
        totals.append(time.perf_counter() - t0)
    return _median(totals[1:])  # the first pass warms the allocator


def optimizer_extra(layers: List[RefConv2d], reps: int, impl: str, lr: float) -> dict:
    """SGD step over the refocusing weights vs over basis-shaped weights (seconds, medians)."""
    out = {}
    for what, shapes in (('refocus', [m.refocus_weight.shape for m in layers]),
                         ('basis', [m.weight.shape for m in layers])):
        model = nn.Module()
        model.params = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in shapes])
        for p in model.params:
            p.grad = torch.randn_like(p)
        opt = make_optimizer(model, lr, impl)
        times = [timed(opt.step, torch.device('cpu'))[0] for _ in range(reps + 1)]
        out[what] = _median(times[1:])  # the first step creates the momentum buffers
        out[what + '_params'] = sum(p.numel() for p in model.params)
        del model, opt
    out['extra'] = out['refocus'] - out['basis']
    return out


def run_transform_cost(bench: Bench, args: argparse.Namespace, speeds: Dict[str, dict]) -> dict:
    """The ``--transform-cost`` view of one model (CPU), with shares of ``speeds``' plain steps."""
    model = bench.build(CONV_CFG['refconv_mm'])
    layers = [m for m in refocus_layers(model, RefConv2d).values()
              if m.refocus_weight.requires_grad]  # the trainable ones
    calls = calls_per_step(bench, model, layers)
    costs = layer_costs(layers, args.reps, calls)
    shared = sorted({c for c in calls.values() if c > 1})
    log(f'\n== {bench.name}: {bench.desc}: {len(layers)} trainable RefConv layers '
        f'({sum(c > 1 for c in calls.values())} called more than once per step: {shared} calls)')
    per_layer = seed_s = 0.0
    groups = []
    for (ksize, grouped), (n, f, fb, seed) in sorted(costs.items()):
        per_step = fb + (0.0 if grouped else f)  # g=1: forward, then recompute + gradient
        per_layer += per_step
        seed_s += seed
        groups.append({'kernel': list(ksize), 'grouped': grouped, 'layers': n, 'forward_s': f,
                       'forward_grad_s': fb, 'per_step_s': per_step, 'seed_per_call_s': seed})
        log(f'  {n:3d} layers {ksize[0]}x{ksize[1]} {"g>1" if grouped else "g=1"}: forward '
            f'{1e3 * f:7.1f} ms, forward+grad {1e3 * fb:7.1f} ms, per step {1e3 * per_step:7.1f} '
            f'ms (seed, per call: {1e3 * seed:7.1f} ms)')
    seq = sequence_cost(layers, args.reps)
    opt = optimizer_extra(layers, args.reps, args.optimizer, bench.lr)
    log(f'  refocusing transform per training step: {1e3 * per_layer:.1f} ms (per-layer medians, '
        f'hot), {1e3 * seq:.1f} ms (in sequence, cold); the seed\'s, refocusing on every call: '
        f'{1e3 * seed_s:.1f} ms')
    log(f'  optimizer extra (SGD {args.optimizer}): {1e3 * opt["extra"]:.1f} ms = '
        f'{1e3 * opt["refocus"]:.1f} ms over {opt["refocus_params"] / 1e6:.1f} M refocusing '
        f'weights - {1e3 * opt["basis"]:.1f} ms over {opt["basis_params"] / 1e6:.1f} M '
        'basis-shaped weights')
    res = {'groups': groups, 'transform_per_layer_s': per_layer, 'transform_in_sequence_s': seq,
           'seed_transform_per_call_s': seed_s, 'optimizer': opt, 'vs_speed_json': {}}
    for path, speed in speeds.items():
        rows = {r['variant']: r for r in speed['rows'] if r['model'] == bench.name}
        if not rows:
            continue
        plain_s, ref = rows['plain']['train_s'], rows['refconv_mm']
        check = {'plain_train_s': plain_s, 'refconv_mm_gap': ref['train_ratio'] - 1,
                 'refconv_mm_gap_paired': ref['train_ratio_paired'] - 1}
        log(f'  vs {path}: plain step {plain_s:.3f} s; refconv_mm {ref["train_ratio"]:.3f}x '
            f'({ref["train_ratio_paired"]:.3f}x paired)')
        for label, cost in (('per-layer', per_layer), ('in-sequence', seq),
                            ('per-layer + optimizer', per_layer + opt['extra']),
                            ('in-sequence + optimizer', seq + opt['extra'])):
            check[label] = {'share': cost / plain_s}
            log(f'    refocusing share, {label:24s}: {cost / plain_s:6.1%} of the plain step '
                f'(refconv_mm adds {check["refconv_mm_gap"]:+.1%}, paired '
                f'{check["refconv_mm_gap_paired"]:+.1%})')
        res['vs_speed_json'][path] = check
    return res


# -- report ------------------------------------------------------------------------
def summarize(name: str, res: dict) -> List[dict]:
    """Per-variant medians, ratios to plain and target verdicts of one model."""
    tt, et, mem = res['train_times_s'], res['eval_times_s'], res['memory_bytes']
    base_t, base_e = _median(tt['plain']), _median(et['plain'])
    base_m = mem['plain']['peak']
    noise = max(MERGED_MIN_NOISE, _iqr_rel(et['plain']))
    # Paired: steps of one round run back to back, so their ratio cancels the drift that moves
    # whole rounds (this shared VM's steps move by +-10 %).
    vs_plain = paired_ratios(tt, 'plain')
    rows = []
    for v in EVAL_VARIANTS[:-1] + tuple(n for n in tt if n not in EVAL_VARIANTS) + ('merged', ):
        row: Dict[str, Any] = {'model': name, 'variant': v}
        if v in tt:
            row['train_s'] = _median(tt[v])
            row['train_ratio'] = row['train_s'] / base_t
            row['train_spread_rel'] = _iqr_rel(tt[v])
            row['train_ratio_paired'] = vs_plain[v]
            if v == 'refconv_mm':
                row['vs_seed_paired'] = paired_ratios(tt, 'seed')[v]
            if v.endswith('+compile'):  # against its own eager variant, step by step
                row['vs_eager_paired'] = paired_ratios(tt, v[:-len('+compile')])[v]
            faults = res.get('train_minor_faults', {}).get(v)
            row['train_minor_faults'] = statistics.mean(faults) if faults else None
            row['peak_mib'] = mem[v]['peak'] / MIB
            row['memory_ratio'] = mem[v]['peak'] / base_m
        if v in et:
            row['eval_ms'] = 1e3 * _median(et[v])
            row['eval_ratio'] = _median(et[v]) / base_e
        targets = []
        if v == 'refconv_mm':
            mem_max = MEMORY_TARGETS[name]
            targets += [('train <= seed', None, row['train_s'] <= _median(tt['seed'])),
                        ('train <= seed (paired)', None, row['vs_seed_paired'] <= 1.0),
                        ('memory', mem_max, row['memory_ratio'] <= mem_max),
                        ('eval unmerged', EVAL_UNMERGED_TARGET,
                         row['eval_ratio'] <= EVAL_UNMERGED_TARGET)]
        elif v == 'merged':
            targets.append((f'eval == plain (+-{noise:.1%})', None,
                            abs(row['eval_ratio'] - 1) <= noise))
        row['targets'] = [{'what': w, 'max_ratio': r, 'met': bool(ok)} for w, r, ok in targets]
        rows.append(row)
    return rows


def _fmt(x: Optional[float], spec: str) -> str:
    return '-' if x is None else format(x, spec)


def markdown_table(rows: List[dict]) -> str:
    """The results as a Markdown table, targets and verdicts in the last column."""
    head = ('| model | variant | train step median (s) | x plain | x plain (paired) '
            '| x seed, or x eager for +compile (paired) | page faults / step | peak memory (MiB) | x plain '
            '| eval forward median (ms) | x plain | targets |')
    lines = [head, '|' + '---|' * 12]
    for r in rows:
        tg = []
        for t in r['targets']:
            bound = f' <= {t["max_ratio"]:.2f}x' if t['max_ratio'] is not None else ''
            tg.append(f'{t["what"]}{bound}: {"met" if t["met"] else "**NOT MET**"}')
        lines.append(
            f'| {r["model"]} | {r["variant"]} | {_fmt(r.get("train_s"), ".3f")} | '
            f'{_fmt(r.get("train_ratio"), ".3f")} | {_fmt(r.get("train_ratio_paired"), ".3f")} | '
            f'{_fmt(r.get("vs_seed_paired", r.get("vs_eager_paired")), ".3f")} | '
            f'{_fmt(r.get("train_minor_faults"), ".0f")} | '
            f'{_fmt(r.get("peak_mib"), ".1f")} | '
            f'{_fmt(r.get("memory_ratio"), ".3f")} | {_fmt(r.get("eval_ms"), ".1f")} | '
            f'{_fmt(r.get("eval_ratio"), ".3f")} | {"; ".join(tg) or "-"} |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', choices=('retinanet', 'mobilenetv2'),
                   default=['retinanet', 'mobilenetv2'])
    p.add_argument('--steps', type=int, default=None,
                   help='timed training steps per variant (default: retinanet 5, mobilenetv2 10)')
    p.add_argument('--eval-steps', type=int, default=None,
                   help='timed eval forwards per variant (default: as --steps)')
    p.add_argument('--warmup', type=int, default=2, help='untimed rounds before timing')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None,
                   help='torch.set_num_threads (default: leave torch\'s default)')
    add_bench_size_args(p)
    p.add_argument('--optimizer', choices=OPTIMIZER_IMPLS, default=DEFAULT_OPTIMIZER,
                   help='SGD implementation, the same for every variant (see make_optimizer)')
    p.add_argument('--amp', action='store_true',
                   help='run every forward under torch.autocast (bf16 on CPU, fp16 on CUDA)')
    p.add_argument('--compile', action='store_true',
                   help='also time plain and refconv_mm with torch.compile (forward + loss)')
    p.add_argument('--compile-backend', default='inductor',
                   help='torch.compile backend for --compile (default inductor)')
    view = p.add_mutually_exclusive_group()
    view.add_argument('--ops', action='store_true',
                      help='per-op self time of a training step, variants interleaved')
    view.add_argument('--transform-cost', action='store_true',
                      help='the refocusing transform alone, per layer type (CPU)')
    p.add_argument('--rounds', type=int, default=8, help='--ops: profiled rounds after a warm-up')
    p.add_argument('--top', type=int, default=25, help='--ops: ops listed per model')
    p.add_argument('--reps', type=int, default=7, help='--transform-cost: repetitions (median)')
    p.add_argument('--speed-json', nargs='+', default=[],
                   help='--transform-cost: results of the default view, for shares of its steps')
    p.add_argument('--out', default=None, help='JSON results (default: outputs/benchmark/'
                   'speed_memory.json, ops.json or transform_cost.json by view)')
    args = p.parse_args(argv)
    if args.out is None:
        name = 'ops' if args.ops else 'transform_cost' if args.transform_cost else 'speed_memory'
        args.out = f'outputs/benchmark/{name}.json'
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the chosen view, print its report and write the JSON; return what was written."""
    args = parse_args(argv)
    quiet_profiler()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cpu' if args.transform_cost else args.device)
    t_start = time.perf_counter()
    log(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, optimizer '
        f'{args.optimizer}')
    out: Dict[str, Any] = {'args': vars(args), 'torch': torch.__version__, 'device': str(device),
                           'threads': torch.get_num_threads()}
    results = {}
    if args.ops:
        for name in args.models:
            results[name] = run_ops(bench_from_args(name, args), args, device)
    elif args.transform_cost:
        torch.manual_seed(0)
        speeds = {}
        for path in args.speed_json:
            with open(path) as f:
                speeds[path] = json.load(f)
        for name in args.models:
            results[name] = run_transform_cost(bench_from_args(name, args), args, speeds)
    else:
        selfcheck = memory_self_check(device)
        log(f'memory method self-check: expected {selfcheck["expected_bytes"]} B, measured '
            f'{selfcheck["measured_bytes"]} B: ok')
        rows = []
        for name in args.models:
            results[name] = run_model(bench_from_args(name, args), args, device)
            rows += summarize(name, results[name])
        table = markdown_table(rows)
        log('\n' + table)
        out.update(memory_self_check=selfcheck, rows=rows, table=table, memory_method=(
            'static (params+buffers+grads+optimizer state) + max running sum of profiler '
            '[memory] events during one step (CPU) / cuda peak increase'))
    out.update(results=results, total_runtime_s=time.perf_counter() - t_start)
    log(f'\ntotal runtime {out["total_runtime_s"]:.0f}s')
    if osp.dirname(args.out):
        os.makedirs(osp.dirname(args.out), exist_ok=True)
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)  # atomic: an interrupted run leaves no half-written JSON
    log(f'wrote {args.out}')
    return out


if __name__ == '__main__':
    main()
