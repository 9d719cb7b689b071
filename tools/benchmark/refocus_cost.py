"""What the refocusing transform alone costs per training step, for the speed benchmark's models.

    python tools/benchmark/refocus_cost.py [--models retinanet mobilenetv2] [--reps 7]
        [--optimizer default|foreach|fused] [--speed-json outputs/benchmark/speed_memory.json]
        [--out outputs/benchmark/refocus_cost.json]

For every trainable RefConv of the model ``speed_memory.py`` builds, times
``refocus_kernel(basis, refocus_weight)`` without grad (the forward) and with grad plus
``autograd.grad`` to the refocusing weights (the kernel backward needs: recompute + gradient),
medians over ``--reps``, summed over layers and grouped by kernel size and grouping. A training
step pays forward + (forward + gradient) for g=1 layers and forward + gradient for g>1 layers,
on top of what a plain conv costs, once per layer and step: a layer called several times per
step (RetinaNet's head, on every FPN level) computes one kernel per step (``RefConv2d``), where
the seed formulation refocuses on every call. Columns:

* ``transform (per layer)``: the sum of per-layer medians, each layer timed ``--reps`` times in a
  row (its data hot in cache): the definition the README used first;
* ``transform (in sequence)``: the median over ``--reps`` passes that run every layer's per-step
  work once, one layer after another, as a training step does (each layer's data cold);
* ``seed (per call)``: what the seed formulation's transform costs per step, for comparison: it
  refocuses on every call (forward + gradient each, kernel kept), so a layer called ``c`` times
  per step (counted in one forward of the model) costs ``c`` times its forward + gradient;
* ``optimizer extra``, reported separately: one SGD step (``--optimizer``, the settings of
  ``speed_memory.py``) over the refocusing weights minus one over basis-shaped weights (what a
  plain model updates for the same convs); inherent to the design, it is not the transform.

With ``--speed-json`` (a ``speed_memory.py`` result) every cost is also given as a share of that
run's plain median train step, and the issue's targets are checked: refconv_mm's train ratio
minus 1 at most the refocusing share plus 1 percentage point, under each definition.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import speed_memory as sm  # noqa: E402
from refconv_mm import RefConv2d  # noqa: E402
from refconv_mm.refocus import refocus_kernel  # noqa: E402


def calls_per_step(bench: 'sm.Bench', model: torch.nn.Module,
                   layers: List[RefConv2d]) -> Dict[RefConv2d, int]:
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


def layer_costs(layers: List[RefConv2d], reps: int,
                calls: Dict[RefConv2d, int]) -> Dict[tuple, list]:
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
        row[1] += statistics.median(fwd)
        row[2] += statistics.median(both)
        row[3] += calls[m] * statistics.median(both)
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
    return statistics.median(totals[1:])  # the first pass warms the allocator


def optimizer_extra(layers: List[RefConv2d], reps: int, impl: str, lr: float) -> dict:
    """SGD step over the refocusing weights vs over basis-shaped weights (seconds, medians)."""
    out = {}
    for what, shapes in (('refocus', [m.refocus_weight.shape for m in layers]),
                         ('basis', [m.weight.shape for m in layers])):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList(params)
        opt = sm.make_optimizer(model, lr, impl)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[what] = statistics.median(times[1:])  # the first step creates the momentum buffers
        out[what + '_params'] = sum(p.numel() for p in params)
        del params, model, opt
    out['extra'] = out['refocus'] - out['basis']
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Time the refocusing transform (and the optimizer extra) per step; optional target check."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=('retinanet', 'mobilenetv2'),
                   default=['retinanet', 'mobilenetv2'])
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--optimizer', choices=sm.OPTIMIZER_IMPLS, default=sm.DEFAULT_OPTIMIZER)
    p.add_argument('--speed-json', nargs='+', default=[],
                   help='speed_memory.py JSON(s): shares of each run\'s plain step, targets')
    p.add_argument('--out', default='outputs/benchmark/refocus_cost.json')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    speeds = {}
    for path in args.speed_json:
        with open(path) as f:
            speeds[path] = json.load(f)
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, optimizer '
          f'{args.optimizer}', flush=True)
    results = {}
    for name in args.models:
        bench = sm.make_bench(name)
        model = bench.build(sm.CONV_CFG['refconv_mm'])
        layers = [m for m in sm.refocus_layers(model, RefConv2d).values()
                  if m.refocus_weight.requires_grad]  # the trainable ones
        calls = calls_per_step(bench, model, layers)
        costs = layer_costs(layers, args.reps, calls)
        shared = sum(c > 1 for c in calls.values())
        print(f'\n{name}: {len(layers)} trainable RefConv layers ({shared} called more than once '
              f'per step: {sorted({c for c in calls.values() if c > 1})} calls)', flush=True)
        per_layer = seed_s = 0.0
        groups = []
        for (ksize, grouped), (n, f, fb, seed) in sorted(costs.items()):
            per_step = fb + (0.0 if grouped else f)  # g=1: forward, then recompute + gradient
            per_layer += per_step
            seed_s += seed
            groups.append({'kernel': list(ksize), 'grouped': grouped, 'layers': n,
                           'forward_s': f, 'forward_grad_s': fb, 'per_step_s': per_step,
                           'seed_per_call_s': seed})
            print(f'  {n:3d} layers {ksize[0]}x{ksize[1]} {"g>1" if grouped else "g=1"}: '
                  f'forward {1e3 * f:7.1f} ms, forward+grad {1e3 * fb:7.1f} ms, '
                  f'per step {1e3 * per_step:7.1f} ms (seed, per call: {1e3 * seed:7.1f} ms)',
                  flush=True)
        seq = sequence_cost(layers, args.reps)
        opt = optimizer_extra(layers, args.reps, args.optimizer, bench.lr)
        res = {'groups': groups, 'transform_per_layer_s': per_layer,
               'transform_in_sequence_s': seq, 'seed_transform_per_call_s': seed_s,
               'optimizer': opt}
        print(f'  refocusing transform per training step: {1e3 * per_layer:.1f} ms (per-layer '
              f'medians, hot), {1e3 * seq:.1f} ms (in sequence, cold); the seed\'s, refocusing '
              f'on every call: {1e3 * seed_s:.1f} ms', flush=True)
        print(f'  optimizer extra (SGD {args.optimizer}): {1e3 * opt["extra"]:.1f} ms = '
              f'{1e3 * opt["refocus"]:.1f} ms over {opt["refocus_params"] / 1e6:.1f} M refocusing '
              f'weights - {1e3 * opt["basis"]:.1f} ms over {opt["basis_params"] / 1e6:.1f} M '
              'basis-shaped weights', flush=True)
        res['vs_speed_json'] = {}
        for path, speed in speeds.items():
            if name not in speed['results']:
                continue
            rows = {r['variant']: r for r in speed['rows'] if r['model'] == name}
            plain_s = rows['plain']['train_s']
            gap = rows['refconv_mm']['train_ratio'] - 1
            # the median of per-round ratios (older result files lack it)
            paired = rows['refconv_mm'].get('train_ratio_paired')
            gap_paired = None if paired is None else paired - 1
            check = {'plain_train_s': plain_s, 'refconv_mm_gap': gap,
                     'refconv_mm_gap_paired': gap_paired}
            print(f'  vs {path}: plain step {plain_s:.3f} s, refconv_mm {gap + 1:.3f}x'
                  + ('' if paired is None else f' ({paired:.3f}x paired)')
                  + f', seed {rows["seed"]["train_ratio"]:.3f}x', flush=True)
            for label, cost in (('per-layer', per_layer), ('in-sequence', seq),
                                ('per-layer + optimizer', per_layer + opt['extra']),
                                ('in-sequence + optimizer', seq + opt['extra'])):
                share = cost / plain_s
                met = gap <= share + 0.01
                check[label] = {'share': share, 'met': met}
                line = (f'    refocusing share, {label:24s}: {share:6.1%}; gap {gap:+.1%} <= share '
                        f'+ 1 pp ({share + 0.01:.1%}): {"met" if met else "NOT MET"}')
                if gap_paired is not None:
                    check[label]['met_paired'] = gap_paired <= share + 0.01
                    line += (f'; paired gap {gap_paired:+.1%}: '
                             f'{"met" if check[label]["met_paired"] else "NOT MET"}')
                print(line, flush=True)
            res['vs_speed_json'][path] = check
        results[name] = res
    if osp.dirname(args.out):
        os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump({'args': vars(args), 'torch': torch.__version__, 'results': results}, f,
                  indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
