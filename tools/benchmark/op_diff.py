"""Per-op self time of a training step, variants interleaved and rotated: what refconv_mm adds.

    python tools/benchmark/op_diff.py [--models retinanet mobilenetv2] [--rounds 8]
        [--optimizer loop|foreach|fused] [--top 25] [--out outputs/benchmark/op_diff.json]

``profile_train_step.py`` profiles one variant after another, so a drift of the machine between
variants lands in its buckets. This script profiles every variant's step in every round, rounds
rotated as in ``speed_memory.py`` (plain, seed, refconv_mm; seed, refconv_mm, plain; ...), and
sums each op's *self* CPU time per step over ``--rounds`` rounds (one untimed round first). It
prints, per model, the total op time per step and the ``--top`` ops that differ most between
refconv_mm and plain, with the seed beside them: everything refconv_mm adds to a step shows up
as ops (the transform's ``bmm`` / ``addcmul`` / grouped conv, the optimizer's fused update over
the refocusing weights, autograd's bookkeeping of the extra nodes), next to the ops that are the
same work in every variant (convs, BN, loss). Models, weights and optimizer are those of
``speed_memory.py``.
"""
import argparse
import json
import logging
import os
import os.path as osp
import statistics
import sys
from collections import Counter
from typing import Dict, Optional, Sequence

import torch
from mmengine.logging import MMLogger
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import speed_memory as sm  # noqa: E402


def op_times(bench: 'sm.Bench', variants: Dict[str, 'sm.Variant'], data, rounds: int,
             device: torch.device) -> Dict[str, dict]:
    """``{variant: {'ops': {op: ms/step}, 'calls': {op: calls/step}, 'walls': [s]}}``."""
    steps: Dict[str, list] = {n: [] for n in sm.TRAIN_VARIANTS}  # per step: {op: (ms, calls)}

    def run(name: str):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = sm.timed(lambda: sm.train_step(bench, variants[name], data), device)
        steps[name].append({e.key: (e.self_cpu_time_total / 1e3, e.count)
                            for e in prof.key_averages()})
        return out
    walls = sm.round_robin(sm.TRAIN_VARIANTS, 1, rounds, run, 'op_diff')
    res = {}
    for name, per_step in steps.items():
        ops, calls = Counter(), Counter()
        for step in per_step[1:]:  # the first is the warm-up round's
            for key, (ms, count) in step.items():
                ops[key] += ms / rounds
                calls[key] += count / rounds
        res[name] = {'ops': ops, 'calls': calls, 'walls': walls[name]}
    return res


def report(name: str, res: Dict[str, dict], top: int) -> str:
    """The totals and the ops that differ most between refconv_mm and plain, as text."""
    names = list(sm.TRAIN_VARIANTS)
    ops = {n: res[n]['ops'] for n in names}
    lines = [f'{name}: step wall (median, profiled) ' + ', '.join(
        f'{n} {statistics.median(res[n]["walls"]):.3f}s' for n in names),
        '  op self time per step (ms): ' + ', '.join(
            f'{n} {sum(ops[n].values()):.1f}' for n in names)]
    keys = set().union(*ops.values())
    diff = sorted(keys, key=lambda k: -abs(ops['refconv_mm'][k] - ops['plain'][k]))
    lines.append(f'  {"op":44s} {"plain":>8s} {"seed":>8s} {"refconv_mm":>10s} '
                 f'{"ref-plain":>9s} {"ref-seed":>9s}  calls plain/seed/ref')
    for k in diff[:top]:
        p, s, r = ops['plain'][k], ops['seed'][k], ops['refconv_mm'][k]
        calls = '/'.join(f'{res[n]["calls"][k]:.0f}' for n in names)
        lines.append(f'  {k[:44]:44s} {p:8.1f} {s:8.1f} {r:10.1f} {r - p:+9.1f} {r - s:+9.1f}  '
                     f'{calls}')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=('retinanet', 'mobilenetv2'),
                   default=['retinanet', 'mobilenetv2'])
    p.add_argument('--rounds', type=int, default=8, help='profiled rounds after a warm-up one')
    p.add_argument('--optimizer', choices=sm.OPTIMIZER_IMPLS, default=sm.DEFAULT_OPTIMIZER)
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--out', default='outputs/benchmark/op_diff.json')
    args = p.parse_args(argv)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    device = torch.device('cpu')
    sm.log(f'torch {torch.__version__}, threads {torch.get_num_threads()}, '
           f'optimizer {args.optimizer}')
    results = {}
    for name in args.models:
        bench = sm.make_bench(name)
        sm.log(f'== {name}: {bench.desc}, {args.rounds} rounds')
        variants, _ = sm.build_variants(bench, device, args.optimizer)
        res = op_times(bench, variants, bench.make_batch(device), args.rounds, device)
        sm.log(report(name, res, args.top))
        results[name] = {n: {'ops_ms': dict(r['ops']), 'calls': dict(r['calls']),
                             'walls_s': r['walls']} for n, r in res.items()}
        del variants
    if osp.dirname(args.out):
        os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump({'args': vars(args), 'torch': torch.__version__, 'results': results}, f)
    sm.log(f'wrote {args.out}')


if __name__ == '__main__':
    main()
