"""Accuracy benchmark: refocus training (RefConv) vs. training the same model further.

RefConv's claim (arXiv 2310.10563): a trained model gets better by refocus
training (basis frozen, refocusing transformation T trained) than by training
it further the usual way. From ONE trained baseline checkpoint per task and the
SAME extra budget (iterations / epochs, schedule, data, lr) this compares:

  continue      the ORIGINAL config trained further (load_from the baseline)
  refconv       RefConv, init='official' (the official code's Kaiming-uniform T)
  refconv_zero  RefConv, init='zero' (T = 0: starts exactly at the baseline)

over several seeds of the extra-training phase (data order, random flips and,
for 'official', the random T), on three tasks:

  det     mmdet RetinaNet-R18-FPN on the generated shapes set, COCO bbox mAP / mAP_50
  seg     mmseg FCN-R18-D8 on the generated shapes set, mIoU
  digits  scikit-learn digits, a small plain-torch CNN (with a depthwise conv), accuracy

det / seg run the repo's real tools (tools/train.py; tools/test.py with
``--eval test`` and ``--verify-merge``) as subprocesses and read the metrics
from mmengine's JSON logs. The det config is the installed RetinaNet-R18-FPN
config with a trainable backbone (no ImageNet weights offline) and, by
default, a 64-channel FPN/head (``--det-width 256`` is the original) and AdamW
(``--det-optimizer sgd`` is the original's) so that the benchmark fits a CPU budget.

    python tools/benchmark/accuracy.py [--tasks det seg digits] [--seeds 0 1 2]
                                       [--work-dir outputs/benchmark/accuracy] [budget knobs]

Writes ``results.json`` and ``accuracy.png`` into the work dir and prints a
Markdown table (mean ± sample std over seeds, per-seed values, baseline).
"""
import argparse
import datetime
import json
import math
import os
import os.path as osp
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:  # refconv_mm may not be pip-installed
    sys.path.insert(0, REPO)
from refconv_mm.experiments.runlogs import logged_metrics  # noqa: E402

ARMS = ('continue', 'refconv', 'refconv_zero')
ARM_INIT = {'refconv': 'official', 'refconv_zero': 'zero'}
# Metric keys as mmdet's CocoMetric / mmseg's IoUMetric name them in the test log.
METRICS = {
    'det': [('coco/bbox_mAP', 'bbox mAP'), ('coco/bbox_mAP_50', 'bbox mAP_50')],
    'seg': [('mIoU', 'mIoU (%)')],
    'digits': [('accuracy', 'accuracy (%)')],
}
# Optimizers without lr (write_config_pair adds it); seg keeps its config's SGD.
OPTIMIZERS = dict(sgd=dict(type='SGD', momentum=0.9, weight_decay=1e-4),
                  adamw=dict(type='AdamW', weight_decay=0.05))

_T0 = time.time()


def log(msg: str) -> None:
    """Print one progress line with the time since the benchmark started."""
    print(f'[{time.time() - _T0:7.1f}s] {msg}', flush=True)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    vals = [float(v) for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return dict(mean=statistics.fmean(vals), std=std)


# ----------------------------------------------------------------------------------------------
# det / seg: the real tools as subprocesses
# ----------------------------------------------------------------------------------------------
def _run(cmd: List[str], log_file: str) -> float:
    """Run ``cmd`` from the repo root with its output in ``log_file``; return wall seconds."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    t = time.time()
    with open(log_file, 'w') as f:
        f.write('$ ' + ' '.join(shlex.quote(c) for c in cmd) + '\n')
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        with open(log_file) as f:
            tail = ''.join(f.readlines()[-30:])
        raise RuntimeError(f'command failed (rc={rc}), log {log_file}:\n{tail}')
    return time.time() - t


def train_and_test(py: str, config: str, run_dir: str, iters: int, cfg_options: List[str],
                   key: str, eval_mode: str = 'val', reuse: bool = False) -> Dict[str, object]:
    """Train ``config`` for ``iters`` with tools/train.py and evaluate the final model.

    ``eval_mode='val'``: the validation tools/train.py runs after the last iteration (the
    same dataloader and evaluator as the test config, one process less); ``'test'``:
    tools/test.py on the saved checkpoint. Returns ``{'metrics', 'checkpoint', 'train_s',
    'test_s'}``; with ``reuse`` a finished run's saved result is returned instead.
    """
    done = osp.join(run_dir, 'result.json')
    if reuse and osp.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    train_dir, test_dir = osp.join(run_dir, 'train'), osp.join(run_dir, 'test')
    # 'val': validate once, after the last iteration; 'test': val_begin past the end skips it.
    val_begin = iters if eval_mode == 'val' else iters + 1
    opts = [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'train_cfg.val_begin={val_begin}'] + cfg_options
    train_s = _run([py, 'tools/train.py', config, '--work-dir', train_dir, '--cfg-options'] + opts,
                   osp.join(run_dir, 'train.log'))
    ckpt = osp.join(train_dir, f'iter_{iters}.pth')
    if not osp.exists(ckpt):
        raise FileNotFoundError(f'training did not write {ckpt}')
    if eval_mode == 'val':
        metrics, test_s = logged_metrics(train_dir, key), 0.0
    else:
        test_s = _run([py, 'tools/test.py', config, ckpt, '--work-dir', test_dir],
                      osp.join(run_dir, 'test.log'))
        metrics = logged_metrics(test_dir, key)
    out = dict(metrics=metrics, checkpoint=ckpt, train_s=train_s, test_s=test_s,
               eval=eval_mode)
    with open(done, 'w') as f:
        json.dump(out, f, indent=1)
    return out


def check_merged(py: str, refconv_cfg: str, baseline_cfg: str, ckpt: str, run_dir: str,
                 key: str) -> Dict[str, float]:
    """Merge a refocused checkpoint (tools/merge_refconv.py), test it with the ORIGINAL config."""
    merged = osp.join(run_dir, 'merged.pth')
    _run([py, 'tools/merge_refconv.py', refconv_cfg, ckpt, merged, '--force'],
         osp.join(run_dir, 'merge.log'))
    test_dir = osp.join(run_dir, 'test_merged')
    _run([py, 'tools/test.py', baseline_cfg, merged, '--work-dir', test_dir],
         osp.join(run_dir, 'test_merged.log'))
    return logged_metrics(test_dir, key)


def run_mm_task(task: str, args: argparse.Namespace, seeds: Sequence[int]) -> Dict[str, object]:
    """Baseline + the three arms x ``seeds`` for ``task`` in ``('det', 'seg')``."""
    from refconv_mm.experiments.shapes_configs import det_cpu_text, write_config_pair
    from refconv_mm.experiments.shapes_data import make_detection_set, make_segmentation_set
    b = budget(task, args)
    root = osp.join(args.work_dir, task)
    data_root = osp.abspath(osp.join(root, 'data'))
    make = make_detection_set if task == 'det' else make_segmentation_set
    make(data_root, num_train=b['num_train'], num_val=b['num_val'], size=b['size'], seed=0)
    base_ckpt = osp.abspath(osp.join(root, 'baseline', 'train', f"iter_{b['base_iters']}.pth"))
    scratch = det_cpu_text(args.det_width, args.det_scratch) if task == 'det' else ''
    key = METRICS[task][0][0]
    common = dict(data_root=data_root, task=task, size=b['size'], batch=b['batch'],
                  optimizer=OPTIMIZERS[args.det_optimizer] if task == 'det' else None)
    base_cfg = write_config_pair(
        osp.join(root, 'configs', 'baseline'), iters=b['base_iters'], lr=b['lr'],
        extra=scratch + schedule_text(args.schedule, b['base_iters']), **common)['baseline']
    # The extra phase gets its own config pairs: the schedule spans the extra iterations.
    configs = {}
    for arm, init in ARM_INIT.items():
        configs[arm] = write_config_pair(
            osp.join(root, 'configs', arm), iters=b['extra_iters'], refocus_iters=b['extra_iters'],
            lr=b['extra_lr'], refconv=dict(type='RefConv', init=init), load_from=base_ckpt,
            extra=scratch + schedule_text(args.schedule, b['extra_iters']), **common)
    extra_cfg = configs['refconv']['baseline']  # the ORIGINAL config, identical in both pairs
    py = args.python
    log(f"{task}: baseline, {b['base_iters']} iters (seed 0) ...")
    base = train_and_test(py, base_cfg, osp.join(root, 'baseline'), b['base_iters'],
                          ['randomness.seed=0'], key, args.eval, args.reuse)
    assert osp.abspath(base['checkpoint']) == base_ckpt, (base['checkpoint'], base_ckpt)
    log(f"{task}: baseline train {base['train_s']:.0f}s test {base['test_s']:.0f}s  "
        + _fmt_metrics(task, base['metrics']))
    arms: Dict[str, Dict[str, object]] = {}
    for seed in seeds:
        for arm in ARMS:
            cfg = extra_cfg if arm == 'continue' else configs[arm]['refconv']
            opts = [f'randomness.seed={seed}', f'load_from={base_ckpt}']
            run_dir = osp.join(root, arm, f'seed{seed}')
            r = train_and_test(py, cfg, run_dir, b['extra_iters'], opts, key, args.eval,
                               args.reuse)
            a = arms.setdefault(arm, dict(seeds=[], runs=[]))
            a['seeds'].append(seed)
            a['runs'].append(r)
            log(f"{task}: {arm:<12} seed {seed}: train {r['train_s']:.0f}s test {r['test_s']:.0f}s"
                f"  {_fmt_metrics(task, r['metrics'])}")
            if args.verify_merge and arm != 'continue' and seed == seeds[0]:
                m = check_merged(py, cfg, extra_cfg, r['checkpoint'], run_dir, key)
                a['merged_check'] = dict(seed=seed, metrics=m)
                log(f'{task}: {arm:<12} seed {seed}: MERGED checkpoint, original config: '
                    + _fmt_metrics(task, m))
    return _summarise(task, {k: base['metrics'][k] for k, _ in METRICS[task]}, arms,
                      budget=b)


def _fmt_metrics(task: str, metrics: Dict[str, float]) -> str:
    return '  '.join(f'{name}={metrics[key]:.4g}' for key, name in METRICS[task])


def _summarise(task: str, baseline: Dict[str, float], arms: Dict[str, Dict[str, object]],
               budget: Dict[str, object]) -> Dict[str, object]:
    """Per arm and metric: the per-seed values and their mean / std."""
    out = dict(baseline=baseline, budget=budget, arms={})
    for arm, a in arms.items():
        entry = dict(seeds=a['seeds'], metrics={})
        for key, _ in METRICS[task]:
            vals = [r['metrics'][key] for r in a['runs']]
            entry['metrics'][key] = dict(values=vals, **mean_std(vals))
        for k in ('merged_check', 'trainable_params'):
            if k in a:
                entry[k] = a[k]
        entry['runs'] = [{k: r.get(k) for k in ('metrics', 'train_s', 'test_s')} for r in a['runs']]
        out['arms'][arm] = entry
    return out


def schedule_text(schedule: str, iters: int) -> str:
    """Config text for the lr schedule of a phase of ``iters`` ('' keeps the config's own)."""
    if schedule == 'constant':
        return ''  # shapes_configs' linear warmup, then a constant lr
    warm = max(1, min(50, iters // 5))  # the same warmup as shapes_configs
    return ('param_scheduler = [\n'
            f"    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end={warm}),\n"
            f"    dict(type='CosineAnnealingLR', by_epoch=False, begin={warm}, end={iters}, "
            f'T_max={iters - warm}, eta_min=0.0)]\n')


def budget(task: str, args: argparse.Namespace) -> Dict[str, object]:
    """The budget knobs of ``task`` from the command line, as one dict."""
    p = task + '_'
    b = {k[len(p):]: v for k, v in vars(args).items() if k.startswith(p)}
    if 'extra_lr' in b and b['extra_lr'] is None:
        b['extra_lr'] = b['lr']  # the extra phase keeps the baseline's lr unless told otherwise
    return b


# ----------------------------------------------------------------------------------------------
# digits: a small plain-torch CNN, nn.Conv2d or RefConv2d from one factory
# ----------------------------------------------------------------------------------------------
def conv_factory(kind: str) -> Callable[..., 'torch.nn.Module']:
    """A conv constructor: ``'plain'`` (nn.Conv2d), ``'official'`` / ``'zero'`` (RefConv2d init)."""
    import torch.nn as nn

    from refconv_mm import RefConv2d
    if kind == 'plain':
        return nn.Conv2d
    return lambda *a, **k: RefConv2d(*a, init=kind, **k)


def digits_net(kind: str = 'plain', width: int = 16) -> 'torch.nn.Module':
    """8x8 digits CNN: 3x3 conv, depthwise 3x3 (channel mixing in T), 1x1, pool, 3x3, GAP, fc."""
    import torch.nn as nn
    conv, w = conv_factory(kind), width

    def block(cin, cout, k, groups=1):
        return [conv(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, w, 3), *block(w, w, 3, groups=w), *block(w, 2 * w, 1),
                         nn.MaxPool2d(2), *block(2 * w, 2 * w, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2 * w, 10))


def _digits_data(test_size: float, split_seed: int):
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    parts = train_test_split(x, y, test_size=test_size, stratify=y, random_state=split_seed)
    return [torch.from_numpy(p) for p in parts]  # xtr, xte, ytr, yte


def _digits_train(model, xtr, ytr, epochs: int, lr: float, batch: int, seed: int,
                  schedule: str) -> None:
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)  # the data order of this phase
    params = [p for p in model.parameters() if p.requires_grad]  # RefConv bases are frozen
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / batch)
    # Cosine to 0 over the phase: the end point is not one noisy SGD step of a constant lr.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))) if schedule == 'cosine'
        else (lambda i: 1.0))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def _digits_acc(model, xte, yte) -> float:
    import torch
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(xte).argmax(1) == yte).float().mean().item()


def run_digits(args: argparse.Namespace, seeds: Sequence[int]) -> Dict[str, object]:
    """Baseline + the three arms x ``seeds`` on scikit-learn digits."""
    import torch
    torch.set_num_threads(args.threads)
    b = budget('digits', args)
    b.pop('seeds', None)
    xtr, xte, ytr, yte = _digits_data(b['test_size'], b['split_seed'])
    torch.manual_seed(0)
    t = time.time()
    base = digits_net('plain', b['width'])
    _digits_train(base, xtr, ytr, b['base_epochs'], b['lr'], b['batch'], 10_000, args.schedule)
    base_sd = base.state_dict()
    base_acc = _digits_acc(base, xte, yte)
    log(f"digits: baseline {b['base_epochs']} epochs ({len(xtr)} train / {len(xte)} test) "
        f'{time.time() - t:.1f}s  accuracy={base_acc:.2f}')
    arms: Dict[str, Dict[str, object]] = {}
    for seed in seeds:
        for arm in ARMS:
            t = time.time()
            torch.manual_seed(seed)  # the 'official' T init of this phase
            model = digits_net('plain' if arm == 'continue' else ARM_INIT[arm], b['width'])
            res = model.load_state_dict(base_sd, strict=False)
            bad = [k for k in res.missing_keys if not k.endswith('refocus_weight')]
            if bad or res.unexpected_keys:
                raise RuntimeError(f'digits: baseline does not fit {arm}: {bad} '
                                   f'{res.unexpected_keys}')
            start = _digits_acc(model, xte, yte)
            _digits_train(model, xtr, ytr, b['extra_epochs'], b['extra_lr'], b['batch'], seed,
                          args.schedule)
            acc = _digits_acc(model, xte, yte)
            a = arms.setdefault(arm, dict(seeds=[], runs=[]))
            a['seeds'].append(seed)
            a['trainable_params'] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            a['runs'].append(dict(metrics=dict(accuracy=acc, accuracy_at_start=start),
                                  train_s=time.time() - t))
            log(f'digits: {arm:<12} seed {seed}: {time.time() - t:.1f}s  accuracy at start '
                f'{start:.2f} -> {acc:.2f}')
    return _summarise('digits', dict(accuracy=base_acc), arms, budget=b)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def markdown_table(results: Dict[str, Dict[str, object]]) -> str:
    """The results as a Markdown table (one row per task, metric and arm)."""
    rows = ['| task | metric | arm | mean ± std | per-seed | baseline (before extra) |',
            '|---|---|---|---|---|---|']
    for task, res in results.items():
        for key, name in METRICS[task]:
            nd = 3 if task == 'det' else 2
            best = max(res['arms'][a]['metrics'][key]['mean'] for a in res['arms'])
            for arm, a in res['arms'].items():
                m = a['metrics'][key]
                mark = ' **(best)**' if m['mean'] == best else ''
                per = ', '.join(f'{v:.{nd}f}' for v in m['values'])
                rows.append(f"| {task} | {name} | {arm}{mark} | {m['mean']:.{nd}f} ± "
                            f"{m['std']:.{nd}f} | {per} | {res['baseline'][key]:.{nd}f} |")
    return '\n'.join(rows)


def plot(results: Dict[str, Dict[str, object]], path: str) -> None:
    """Bar chart per task/metric: arm means with std error bars, seeds as dots, baseline dashed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(t, k, n) for t in results for k, n in METRICS[t]]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 3.6 * len(panels)), 3.8),
                             squeeze=False)
    colors = {'continue': '#7f7f7f', 'refconv': '#1f77b4', 'refconv_zero': '#2ca02c'}
    for ax, (task, key, name) in zip(axes[0], panels):
        res = results[task]
        arms = list(res['arms'])
        means = [res['arms'][a]['metrics'][key]['mean'] for a in arms]
        stds = [res['arms'][a]['metrics'][key]['std'] for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=5,
               color=[colors.get(a, 'C3') for a in arms], alpha=0.85)
        for i, a in enumerate(arms):
            vals = res['arms'][a]['metrics'][key]['values']
            ax.plot([i] * len(vals), vals, 'k.', ms=4)
        base = res['baseline'][key]
        ax.axhline(base, ls='--', color='k', lw=1)
        lo = min([base] + [m - s for m, s in zip(means, stds)] +
                 [v for a in arms for v in res['arms'][a]['metrics'][key]['values']])
        hi = max([base] + [m + s for m, s in zip(means, stds)] +
                 [v for a in arms for v in res['arms'][a]['metrics'][key]['values']])
        pad = max(hi - lo, 1e-6) * 0.3
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=15)
        ax.set_title(f'{task}: {name}')
    fig.suptitle('Same checkpoint, same extra budget: mean ± std over seeds (dots: seeds, '
                 'dashed: baseline before the extra training)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (tasks, seeds, work dir and every budget knob)."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--tasks', nargs='+', default=['det', 'seg', 'digits'],
                   choices=['det', 'seg', 'digits'])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2],
                   help='seeds of the extra-training phase')
    p.add_argument('--work-dir', default='outputs/benchmark/accuracy')
    p.add_argument('--python', default=sys.executable, help='interpreter for the mm tools')
    p.add_argument('--reuse', action='store_true',
                   help='reuse finished det/seg runs found in the work dir')
    p.add_argument('--verify-merge', action='store_true',
                   help='also merge the first seed\'s refocused checkpoints and test them with '
                   'the ORIGINAL config')
    p.add_argument('--schedule', choices=['cosine', 'constant'], default='cosine',
                   help='lr schedule of every phase (baseline and extra alike): linear warmup '
                   '+ cosine to 0 (det/seg), cosine to 0 (digits); or a constant lr')
    p.add_argument('--eval', choices=['val', 'test'], default='val',
                   help="det/seg metric: 'val' = the validation after the last training "
                   "iteration (same data/evaluator as test); 'test' = tools/test.py on the "
                   'saved checkpoint (one more process per run)')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads for digits (1: the tiny net gains nothing from more)')
    # Defaults sized for 2 CPU cores (det: ~20 min for 300 + 3 arms x 3 seeds x 150 iterations);
    # grow them wherever compute allows.
    for task, d in (('det', dict(num_train=120, num_val=32, size=128, batch=4, base_iters=300,
                                 extra_iters=150, lr=1e-3)),
                    ('seg', dict(num_train=120, num_val=32, size=64, batch=4, base_iters=100,
                                 extra_iters=20, lr=0.01))):
        g = p.add_argument_group(task)
        for k, v in d.items():
            g.add_argument(f'--{task}-{k.replace("_", "-")}', type=type(v), default=v)
        g.add_argument(f'--{task}-extra-lr', type=float, default=None,
                       help='lr of the extra phase (all arms); default: the baseline lr')
    p.add_argument('--det-optimizer', choices=sorted(OPTIMIZERS), default='adamw',
                   help='det optimizer (lr from --det-lr): AdamW trains the from-scratch '
                   'RetinaNet far faster than the original SGD at these budgets')
    p.add_argument('--det-width', type=int, default=64,
                   help='FPN / RetinaNet head channels (the original config: 256)')
    p.add_argument('--no-det-scratch', dest='det_scratch', action='store_false',
                   help='keep RetinaNet\'s frozen stem/layer1 and frozen BN stats (meant for '
                   'ImageNet weights, which this offline benchmark does not have)')
    g = p.add_argument_group('digits')
    for k, v in dict(base_epochs=10, extra_epochs=10, lr=0.01, batch=32, width=16, test_size=0.5,
                     split_seed=0).items():
        g.add_argument(f'--digits-{k.replace("_", "-")}', type=type(v), default=v)
    g.add_argument('--digits-extra-lr', type=float, default=None,
                   help='lr of the extra epochs (all arms); default: the baseline lr')
    g.add_argument('--digits-seeds', nargs='+', type=int, default=None,
                   help='seeds for digits only (it is cheap); default: --seeds')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the benchmark, print the table, write results.json and accuracy.png."""
    args = parse_args(argv)
    args.work_dir = osp.abspath(args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    command = ' '.join(shlex.quote(a) for a in [osp.relpath(sys.argv[0], REPO)] +
                       list(sys.argv[1:] if argv is None else argv))
    date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    header = (f'# RefConv accuracy benchmark ({date})\n'
              f'command: python {command}\n'
              f"arms: continue (original config), refconv (init='official'), "
              f"refconv_zero (init='zero'); seeds {args.seeds}"
              + (f' (digits: {args.digits_seeds})' if args.digits_seeds else '')
              + f'; lr schedule per phase: {args.schedule}; std = sample std (ddof=1)')
    print(header, flush=True)
    results: Dict[str, Dict[str, object]] = {}
    for task in args.tasks:
        t = time.time()
        results[task] = run_digits(args, args.digits_seeds or args.seeds) \
            if task == 'digits' else run_mm_task(task, args, args.seeds)
        results[task]['runtime_s'] = time.time() - t
        log(f'{task}: done in {time.time() - t:.0f}s')
    total = time.time() - _T0
    table = markdown_table(results)
    print('\n' + header + '\n')
    for task, res in results.items():
        print(f'{task} budget: ' + ', '.join(f'{k}={v}' for k, v in res['budget'].items()))
    print('\n' + table + f'\n\ntotal runtime: {total / 60:.1f} min')
    out = dict(date=date, command='python ' + command, seeds=args.seeds, schedule=args.schedule,
               digits_seeds=args.digits_seeds or args.seeds, total_runtime_s=total,
               std='sample std (ddof=1)', results=results)
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(out, f, indent=1, default=str)
    plot(results, osp.join(args.work_dir, 'accuracy.png'))
    print(f"wrote {osp.join(args.work_dir, 'results.json')} and "
          f"{osp.join(args.work_dir, 'accuracy.png')}")
    return out


if __name__ == '__main__':
    main()
