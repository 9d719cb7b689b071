"""What the refocusing transform alone costs per training step, for the speed benchmark's models.

    python tools/benchmark/refocus_cost.py [--models retinanet mobilenetv2] [--reps 7]

For every trainable RefConv of the model ``speed_memory.py`` builds, times
``refocus_kernel(basis, refocus_weight)`` without grad (the forward) and with grad plus
``autograd.grad`` to the refocusing weights (the kernel backward needs: recompute + gradient),
medians over ``--reps``, summed over layers and grouped by kernel size and grouping. A training
step pays forward + (forward + gradient) for g=1 layers and forward + gradient for g>1 layers,
on top of what a plain conv costs; compare with the plain train step of ``speed_memory.py``.
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import speed_memory as sm  # noqa: E402
from refconv_mm import RefConv2d  # noqa: E402
from refconv_mm.refocus import refocus_kernel  # noqa: E402


def layer_costs(model: torch.nn.Module, reps: int) -> Dict[tuple, list]:
    """``{(kernel size, grouped): [layers, fwd s, fwd+grad s]}`` over trainable RefConvs."""
    out: Dict[tuple, list] = {}
    for m in model.modules():
        if not (isinstance(m, RefConv2d) and m.refocus_weight.requires_grad):
            continue
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
        row = out.setdefault((tuple(basis.shape[2:]), m.groups > 1), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += statistics.median(fwd)
        row[2] += statistics.median(both)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=('retinanet', 'mobilenetv2'),
                   default=['retinanet', 'mobilenetv2'])
    p.add_argument('--reps', type=int, default=7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}')
    for name in args.models:
        bench = sm.retinanet_bench(512, 2) if name == 'retinanet' else sm.mobilenetv2_bench(224, 16)
        costs = layer_costs(bench.build(sm.CONV_CFG['refconv_mm']), args.reps)
        print(f'\n{name}:')
        step = 0.0
        for (ksize, grouped), (n, f, fb) in sorted(costs.items()):
            per_step = fb + (0.0 if grouped else f)  # g=1: forward, then recompute + gradient
            step += per_step
            print(f'  {n:3d} layers {ksize[0]}x{ksize[1]} {"g>1" if grouped else "g=1"}: '
                  f'forward {1e3 * f:7.1f} ms, forward+grad {1e3 * fb:7.1f} ms, '
                  f'per step {1e3 * per_step:7.1f} ms')
        print(f'  refocusing per training step: {1e3 * step:.1f} ms')


if __name__ == '__main__':
    main()
