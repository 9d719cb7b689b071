"""Where a training step's time goes: per op and per conv layer type, for plain / seed / refconv_mm.

    python tools/benchmark/profile_train_step.py [--models retinanet mobilenetv2]
        [--variants plain seed refconv_mm] [--steps 3] [--warmup 1] [--device cpu|cuda]
        [--optimizer loop|foreach|fused] [--top 15] [--out PATH]

The models, variants, weights and optimizer are exactly those of ``speed_memory.py`` (its
builders are reused). Each variant runs ``--warmup`` untimed steps, then ``--steps`` steps under
``torch.profiler`` (CPU activity, plus CUDA on a GPU). Every op's *self* time is put in one bucket
``phase / part / layer type``:

* phase: ``forward``, ``backward``, ``optimizer`` (``optimizer.step``) or ``zero_grad``;
* layer type of the conv the op belongs to: ``regular`` (kxk, k>1, g=1), ``1x1`` or ``depthwise``
  (g>1), found by labelling each conv module's forward with ``record_function``; a backward op
  belongs to the layer whose forward op created its autograd node (matched by ``sequence_nr``);
* part: ``conv`` (the conv itself), ``refocus`` (the refocusing transform: refconv_mm's
  ``refocus_kernel``, wherever it runs, including the g=1 recompute in backward, or the seed's
  ``weight + convmap(weight)``), ``other`` (everything that is not a conv: BN, activations,
  loss, autograd's AccumulateGrad, ...).

The profiler slows small ops down, so the buckets are shares of the *profiled* step; the
unprofiled median step time of the same variant is reported beside it. Also reported: the top
``--top`` ops by self time, and the optimizer's parameter count. Progress is printed; results
go to ``--out`` as JSON.
"""
import argparse
import contextlib
import json
import logging
import os
import os.path as osp
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from torch.autograd.profiler import record_function

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import speed_memory as sm  # noqa: E402
import refconv_mm.refconv as refconv_mod  # noqa: E402
import refconv_mm.refocus as refocus_mod  # noqa: E402
from refconv_mm import RefConv2d  # noqa: E402

PHASES = ('zero_grad', 'forward', 'backward', 'optimizer')
LAYER_TAG, REFOCUS_TAG, PHASE_TAG = 'layer::', 'refocus::', 'phase::'


def layer_kind(kernel_size, groups: int) -> str:
    """``regular`` / ``1x1`` / ``depthwise`` (any g>1) for a conv's geometry."""
    if groups > 1:
        return 'depthwise'
    return '1x1' if tuple(kernel_size) == (1, 1) else 'regular'


@contextlib.contextmanager
def labelled(model: nn.Module):
    """Label every conv's forward ``layer::KIND`` and every refocusing transform ``refocus::KIND``.

    Patches are undone on exit; the computation is unchanged (the seed's forward is replaced by
    the same ops with a label around its kernel computation).
    """
    handles, stack = [], []

    def pre(kind):
        def hook(mod, args):
            rf = record_function(LAYER_TAG + kind)
            rf.__enter__()
            stack.append(rf)
        return hook

    def post(mod, args, out):
        stack.pop().__exit__(None, None, None)

    for m in model.modules():
        # modules() visits a SeedRefConv before its convmap child, which is marked then.
        if isinstance(m, (nn.Conv2d, sm.SeedRefConv)) and not getattr(m, '_is_convmap', False):
            kind = layer_kind(m.kernel_size, m.groups)
            handles.append(m.register_forward_pre_hook(pre(kind)))
            handles.append(m.register_forward_hook(post))
        if isinstance(m, sm.SeedRefConv):
            m.convmap._is_convmap = True

    orig_kernel = refocus_mod.refocus_kernel
    orig_seed_forward = sm.SeedRefConv.forward

    def kernel(basis, refocus_weight):
        kind = layer_kind(basis.shape[2:], refocus_weight.shape[1])
        with record_function(REFOCUS_TAG + kind):
            return orig_kernel(basis, refocus_weight)

    def seed_forward(self, inputs):
        k = self.kernel_size[0]
        with record_function(REFOCUS_TAG + layer_kind(self.kernel_size, self.groups)):
            origin_weight = self.weight.view(1, self.num_2d_kernels, k, k)
            w = self.weight + self.convmap(origin_weight).view(*self.origin_kernel_shape)
        return F.conv2d(inputs, w, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups, bias=self.bias)

    # the layer's forward (refconv) and the backward recompute (refocus) call it by name
    refocus_mod.refocus_kernel = refconv_mod.refocus_kernel = kernel
    sm.SeedRefConv.forward = seed_forward
    try:
        yield
    finally:
        refocus_mod.refocus_kernel = refconv_mod.refocus_kernel = orig_kernel
        sm.SeedRefConv.forward = orig_seed_forward
        for h in handles:
            h.remove()
        for m in model.modules():
            m.__dict__.pop('_is_convmap', None)


def profiled_step(bench: sm.Bench, v: sm.Variant, data) -> None:
    """One training step with each phase labelled."""
    with record_function(PHASE_TAG + 'zero_grad'):
        v.optimizer.zero_grad(set_to_none=True)
    with record_function(PHASE_TAG + 'forward'):
        loss = bench.train_loss(v.model, data)
    with record_function(PHASE_TAG + 'backward'):
        loss.backward()
    with record_function(PHASE_TAG + 'optimizer'):
        v.optimizer.step()


def _labels(e) -> Dict[str, str]:
    """Nearest phase / layer / refocus labels above event ``e`` (itself included)."""
    out: Dict[str, str] = {}
    while e is not None:
        for tag in (PHASE_TAG, LAYER_TAG, REFOCUS_TAG):
            if e.name.startswith(tag) and tag not in out:
                out[tag] = e.name[len(tag):]
        e = e.cpu_parent
    return out


def _root(e):
    while e.cpu_parent is not None and not e.cpu_parent.name.startswith(PHASE_TAG):
        e = e.cpu_parent
    return e


def breakdown(events, steps: int) -> Dict[str, float]:
    """Self time (ms per step) per ``phase/part/layer type`` bucket."""
    events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    fwd_by_seq = {}
    for e in events:
        lab = _labels(e)
        if lab.get(PHASE_TAG) == 'forward' and e.sequence_nr >= 0 and LAYER_TAG in lab:
            fwd_by_seq.setdefault(e.sequence_nr, lab)
    buckets: Dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith((PHASE_TAG, LAYER_TAG, REFOCUS_TAG)):
            continue
        lab = _labels(e)
        phase = lab.get(PHASE_TAG)
        if phase is None:
            continue
        if phase == 'backward' and LAYER_TAG not in lab:
            root = _root(e)  # the autograd node's evaluate_function event
            lab = {**fwd_by_seq.get(root.sequence_nr, {}), **lab}
        if REFOCUS_TAG in lab:
            key = f'{phase}/refocus/{lab[REFOCUS_TAG]}'
        elif LAYER_TAG in lab:
            key = f'{phase}/conv/{lab[LAYER_TAG]}'
        else:
            key = f'{phase}/other'
        buckets[key] += e.self_cpu_time_total / 1e3 / steps
    return dict(sorted(buckets.items()))


def phase_walls(events, steps: int) -> Dict[str, float]:
    """Wall time (ms per step) of each phase label."""
    out: Dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(PHASE_TAG):
            out[e.name[len(PHASE_TAG):]] += e.cpu_time_total / 1e3 / steps
    return dict(out)


def top_ops(prof, top: int, steps: int) -> list:
    """The ``top`` ops by self CPU time (ms per step), labels excluded."""
    rows = [(a.key, a.self_cpu_time_total / 1e3 / steps, a.count // steps)
            for a in prof.key_averages()
            if not a.key.startswith((PHASE_TAG, LAYER_TAG, REFOCUS_TAG))]
    rows.sort(key=lambda r: -r[1])
    return [{'op': k, 'self_ms': round(t, 2), 'calls': c} for k, t, c in rows[:top]]


def summarize(buckets: Dict[str, float]) -> Dict[str, float]:
    """Totals per part and per layer type (all phases), and per phase."""
    out: Dict[str, float] = defaultdict(float)
    for key, ms in buckets.items():
        parts = key.split('/')
        out['phase:' + parts[0]] += ms
        out['part:' + parts[1]] += ms
        if len(parts) == 3:
            out[f'{parts[1]}:{parts[2]}'] += ms
        out['total'] += ms
    return dict(sorted(out.items()))


def profile_variant(bench: sm.Bench, v: sm.Variant, data, args, device) -> dict:
    """Unprofiled median step time, then the profiled breakdown of ``--steps`` steps."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(args.warmup):
        sm.train_step(bench, v, data)
    walls = [sm.timed(lambda: sm.train_step(bench, v, data), device)[0] for _ in range(args.steps)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with labelled(v.model), profile(activities=acts) as prof:
        for _ in range(args.steps):
            profiled_step(bench, v, data)
        sm._sync(device)
    events = prof.events()
    buckets = breakdown(events, args.steps)
    params = [p for g in v.optimizer.param_groups for p in g['params']]
    return {
        'step_wall_median_s': statistics.median(walls), 'step_walls_s': walls,
        'phase_wall_ms': phase_walls(events, args.steps), 'buckets_ms': buckets,
        'summary_ms': summarize(buckets), 'top_ops': top_ops(prof, args.top, args.steps),
        'optimizer_params': sum(p.numel() for p in params),
        'optimizer': sm.optimizer_desc(v.optimizer),
    }


def print_variant(name: str, r: dict) -> None:
    """Human-readable breakdown of one variant."""
    s = r['summary_ms']
    sm.log(f'  {name}: unprofiled step median {r["step_wall_median_s"] * 1e3:.0f} ms; profiled '
           f'(self time, ms/step): total {s["total"]:.0f} = ' + ', '.join(
               f'{p} {s.get("phase:" + p, 0):.0f}' for p in PHASES) +
           f'; optimizer over {r["optimizer_params"] / 1e6:.1f} M params ({r["optimizer"]})')
    for key, ms in r['buckets_ms'].items():
        sm.log(f'    {key:32s} {ms:8.1f} ms  {100 * ms / s["total"]:5.1f}%')
    sm.log('    top ops: ' + '; '.join(f'{o["op"]} {o["self_ms"]:.0f} ms x{o["calls"]}'
                                       for o in r['top_ops'][:8]))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Profile the requested models and variants; print and write the breakdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=('retinanet', 'mobilenetv2'),
                   default=['retinanet', 'mobilenetv2'])
    p.add_argument('--variants', nargs='+', choices=sm.TRAIN_VARIANTS, default=sm.TRAIN_VARIANTS)
    p.add_argument('--steps', type=int, default=3, help='profiled (and unprofiled) steps')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--optimizer', choices=sm.OPTIMIZER_IMPLS, default=sm.DEFAULT_OPTIMIZER)
    p.add_argument('--top', type=int, default=15)
    sm.add_bench_size_args(p)
    p.add_argument('--out', default='outputs/benchmark/profile_train_step.json')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sm.log(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}')
    results = {}
    for name in args.models:
        MMLogger.get_current_instance().setLevel(logging.WARNING)
        bench = sm.bench_from_args(name, args)
        t0 = time.perf_counter()
        variants, info = sm.build_variants(bench, device, args.optimizer)
        data = bench.make_batch(device)
        sm.log(f'\n== {name}: {bench.desc}, built in {time.perf_counter() - t0:.0f}s')
        results[name] = {'desc': bench.desc, 'info': info, 'variants': {}}
        for vname in args.variants:
            r = profile_variant(bench, variants[vname], data, args, device)
            results[name]['variants'][vname] = r
            print_variant(vname, r)
        del variants
    if osp.dirname(args.out):
        os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump({'args': vars(args), 'torch': torch.__version__, 'results': results}, f,
                  indent=1)
    sm.log(f'wrote {args.out}')


if __name__ == '__main__':
    main()
