"""The main job, one command: baseline -> refocus (RefConv) -> merge -> evaluate -> report.

    python tools/demo.py                       # embedded default: generated shapes data
    python tools/demo.py --config MY_REFCONV_CFG.py --checkpoint MY_TRAINED.pth

Default: deterministically generates a small COCO-format shapes set, trains an
mmdet RetinaNet-R18-FPN with the ORIGINAL installed config (adapted to the data and
to a CPU budget: from-scratch backbone with batch-stat BN, 64-channel FPN/head,
AdamW; see refconv_mm.experiments.shapes_configs.det_cpu_text), refocus-trains it with the
one-line RefConv override and RefConvHook, merges with tools/merge_refconv.py,
evaluates baseline / refocused / merged, prints a table and writes
training-curve plots. Beside them it runs the equal-budget control: the same trained model
trained further with the ORIGINAL config for the same extra iterations and schedule
("continued"), so the table never credits RefConv with what more training gives.
With --config/--checkpoint the baseline stage is skipped and your RefConv config is
refocus-trained from your checkpoint.
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

# Before torch loads here or in the tools this runs: OpenMP threads that spin while they wait
# stall each other when another process holds a core (measured on 2 busy cores: one 128x128
# forward 80-1600 ms, 36 ms with PASSIVE), which would land in the table's times.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, ROOT)
from refconv_mm.experiments.runlogs import last_checkpoint, logged_metrics, train_curve  # noqa: E402

# What each model runs at inference: baseline, continued and merged are the ORIGINAL config's
# plain model; the refocused one, unmerged, computes each conv's kernel from its frozen basis
# through the refocusing transform at every forward.
ARCH = dict(baseline='plain', continued='plain', merged='plain',
            refocused='plain + refocusing transform per conv (unmerged)')
# Error lines are shown besides progress (but not build flags naming -Werror).
PROBLEM = re.compile(r'^\s*(\w+(Error|Exception)\b|.*\bERROR\b)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='refconv_mm end-to-end demo')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'outputs', 'demo'),
                   help='where data, checkpoints, logs, table and plots go')
    p.add_argument('--config', help='your RefConv config (skips data generation and baseline)')
    p.add_argument('--checkpoint', help='the trained checkpoint your RefConv config starts from')
    p.add_argument('--baseline-config', help='with --config: the ORIGINAL config, to evaluate '
                   'the baseline and the merged model with it (default: derived by removing '
                   'the RefConv override)')
    p.add_argument('--iters', type=int, default=300, help='baseline training iterations')
    p.add_argument('--refocus-iters', type=int, default=150, help='refocus training iterations')
    p.add_argument('--lr', type=float, default=1e-3, help='baseline AdamW learning rate')
    p.add_argument('--refocus-lr', type=float, default=None,
                   help='refocus AdamW learning rate (default: --lr)')
    p.add_argument('--seed', type=int, default=0, help='data and training seed')
    p.add_argument('--no-control', dest='control', action='store_false',
                   help='skip the equal-budget "continued" arm (the ORIGINAL config trained '
                   'further for the refocus budget)')
    p.add_argument('--force', action='store_true', help='reuse/overwrite an existing work dir')
    p.add_argument('--cfg-options', nargs='+', default=[],
                   help='passed to every training/test run (key=value)')
    return p.parse_args(argv)


def stage(msg: str) -> None:
    print(f'\n==> [{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run(args, log_path: str) -> float:
    """Run a tool in a subprocess, streaming a filtered progress view; return seconds taken."""
    t0 = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if (any(k in line for k in ('Iter(train)', 'Iter(val)', 'Iter(test)', 'RefConvHook:',
                                        'verify:', 'merged ', 'Traceback'))
                    or PROBLEM.match(line)):
                print('    ' + line.rstrip().split(' - INFO - ', 1)[-1][:160], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f'{args[0]} failed (exit {proc.returncode}); full log: {log_path}')
    return time.perf_counter() - t0


# Inference timing: every round times each model once on the same input, in an order rotated
# every round (refconv_mm.experiments.timing). A multiple of 3 and 4 puts each of the three or
# four models at every position equally often.
INFER_ROUNDS, INFER_WARMUP, INFER_SIZE = 24, 2, (128, 128)


def time_inference(arms: dict, rounds: int = INFER_ROUNDS, warmup: int = INFER_WARMUP) -> dict:
    """Eval forward times (ms) of one val-sized image through each model as saved.

    ``arms``: name -> (config, checkpoint), the first being the reference (the baseline).
    Returns per-round times, medians and paired ratios to the reference (the median over rounds
    of the model's time over the reference's in the same round).
    """
    import torch
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from refconv_mm.experiments.timing import interleaved_times, medians, paired_ratios
    from refconv_mm.verify import build_model, random_batch
    models = {}
    for name, (cfg_path, ckpt) in arms.items():
        models[name] = build_model(Config.fromfile(cfg_path))
        load_checkpoint(models[name], ckpt, map_location='cpu', logger='silent')
    x, samples = random_batch(next(iter(models.values())), INFER_SIZE)  # one input for all
    calls = {n: (lambda m=m: m(x, samples, mode='tensor')) for n, m in models.items()}
    with torch.no_grad():
        secs = interleaved_times(calls, rounds=rounds, warmup=warmup)
    ms = {n: [1e3 * t for t in ts] for n, ts in secs.items()}
    return dict(median_ms=medians(ms), ratio=paired_ratios(ms, next(iter(ms))), rounds_ms=ms,
                protocol=dict(rounds=rounds, warmup_rounds=warmup, order='rotated every round',
                              input=f'1x3x{INFER_SIZE[0]}x{INFER_SIZE[1]}, the same for all',
                              threads=torch.get_num_threads(),
                              omp_wait_policy=os.environ.get('OMP_WAIT_POLICY')))


def param_counts(cfg_path: str) -> dict:
    """Parameter counts of the model a config builds (RefConv split into basis / refocus)."""
    from mmengine.config import Config

    from refconv_mm.hook import refconv_summary
    from refconv_mm.verify import build_model
    model = build_model(Config.fromfile(cfg_path))
    total = sum(p.numel() for p in model.parameters())
    s = refconv_summary(model)
    return dict(total=total, basis=s['basis'], refocus=s['refocus'] + s['refocus_frozen'],
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def plot_curves(out: str, curves: dict, metrics: dict, metric_key: str) -> None:
    """Training-loss curves (baseline then refocus, on one iteration axis) and the metric bars."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = 0
    for name, (its, losses) in curves.items():
        if its:
            a.plot([i + offset for i in its], losses, label=name)
            if name == 'baseline':
                offset = max(its)
    if offset:
        a.axvline(offset, color='gray', ls='--', lw=1)
    a.set_xlabel('iteration')
    a.set_ylabel('training loss')
    a.set_title('Training curves (continued / refocus training start at the dashed line)')
    a.legend()
    names = list(metrics)
    vals = [metrics[n].get(metric_key, float('nan')) for n in names]
    colors = dict(baseline='#888', continued='#c84', refocused='#2a7', merged='#27a')
    b.bar(names, vals, color=[colors.get(n, '#555') for n in names])
    for i, v in enumerate(vals):
        b.text(i, v, f'{v:.4f}', ha='center', va='bottom')
    b.set_title(metric_key)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import importlib.util
    if not args.config and importlib.util.find_spec('mmdet') is None:
        # the embedded default is a detector; a segmentation/classification user brings a config
        raise SystemExit('demo: the default run trains an mmdet RetinaNet and mmdet is not '
                         'installed; install mmdet 3.x or pass --config/--checkpoint of your '
                         'own mmseg/mmpretrain model')
    work = osp.abspath(args.work_dir)
    if osp.isdir(work) and os.listdir(work) and not args.force:
        raise SystemExit(f'demo: {work} exists and is not empty; pass --force to reuse it '
                         'or --work-dir to choose another')
    os.makedirs(work, exist_ok=True)
    if bool(args.config) != bool(args.checkpoint):
        raise SystemExit('demo: --config and --checkpoint go together (your RefConv config '
                         'and the trained checkpoint it starts from)')
    t0 = time.perf_counter()
    opts = ['--cfg-options', f'randomness.seed={args.seed}', *args.cfg_options]
    n_stages = (5 if args.config else 6) + int(args.control)
    k = 0
    times = {}

    def next_stage(msg):
        nonlocal k
        k += 1
        stage(f'[{k}/{n_stages}] {msg}')

    if args.config:
        refconv_cfg, base_ckpt = osp.abspath(args.config), osp.abspath(args.checkpoint)
        baseline_cfg = args.baseline_config
        if not baseline_cfg:
            from mmengine.config import Config

            import refconv_mm  # noqa: F401
            from refconv_mm.config import plain_config
            baseline_cfg = osp.join(work, 'baseline_config.py')
            plain_config(Config.fromfile(refconv_cfg)).dump(baseline_cfg)
    else:
        from refconv_mm.experiments.shapes_configs import det_cpu_text, write_config_pair
        from refconv_mm.experiments.shapes_data import make_detection_set
        next_stage('generating the shapes detection set (COCO format)')
        data = make_detection_set(osp.join(work, 'data'), num_train=64, num_val=24, size=128,
                                  seed=args.seed)
        print(f"    {data['data_root']}: 64 train / 24 val images, 3 classes")
        paths = write_config_pair(osp.join(work, 'configs'), data['data_root'], 'det',
                                  iters=args.iters, refocus_iters=args.refocus_iters, size=128,
                                  batch=4, lr=args.lr, refocus_lr=args.refocus_lr,
                                  optimizer=dict(type='AdamW', weight_decay=0.05),
                                  log_interval=max(1, min(args.iters, args.refocus_iters) // 10),
                                  extra=det_cpu_text(width=64))
        baseline_cfg, refconv_cfg = paths['baseline'], paths['refconv']
        print(f'    ORIGINAL config : {baseline_cfg}\n    RefConv config  : {refconv_cfg}')
        next_stage(f'training the baseline with the ORIGINAL config ({args.iters} iterations)')
        times['baseline'] = run(['tools/train.py', baseline_cfg, '--work-dir',
                                 osp.join(work, 'baseline'), *opts],
                                osp.join(work, 'baseline.log'))
        base_ckpt = last_checkpoint(osp.join(work, 'baseline'))

    if args.control:
        # The equal-budget control: the refocus config minus RefConv is the ORIGINAL config
        # with the refocus stage's iterations, schedule and lr.
        from mmengine.config import Config

        import refconv_mm  # noqa: F401
        from refconv_mm.config import plain_config
        continued_cfg = osp.join(work, 'continued_config.py')
        plain_config(Config.fromfile(refconv_cfg)).dump(continued_cfg)
        next_stage(f'equal-budget control: training {osp.basename(base_ckpt)} further with the '
                   'ORIGINAL config (same extra iterations, schedule and lr as refocusing)')
        times['continued'] = run(['tools/train.py', continued_cfg, '--work-dir',
                                  osp.join(work, 'continued'), *opts, f'load_from={base_ckpt}'],
                                 osp.join(work, 'continued.log'))
        cont_ckpt = last_checkpoint(osp.join(work, 'continued'))

    next_stage(f'refocus training with RefConv from {osp.basename(base_ckpt)}')
    times['refocus'] = run(['tools/train.py', refconv_cfg, '--work-dir',
                            osp.join(work, 'refocus'), *opts, f'load_from={base_ckpt}'],
                           osp.join(work, 'refocus.log'))
    ref_ckpt = last_checkpoint(osp.join(work, 'refocus'))

    next_stage('merging RefConv into plain convs (tools/merge_refconv.py --verify)')
    merged = osp.join(work, 'merged.pth')
    run(['tools/merge_refconv.py', refconv_cfg, ref_ckpt, merged, '--verify', '--force',
         '--out-config', osp.join(work, 'merged_config.py')], osp.join(work, 'merge.log'))

    arms = [('baseline', baseline_cfg, base_ckpt), ('refocused', refconv_cfg, ref_ckpt),
            ('merged', baseline_cfg, merged)]
    if args.control:
        arms.insert(1, ('continued', continued_cfg, cont_ckpt))
    next_stage('evaluating ' + ', '.join(a[0] for a in arms) + ' models')
    metrics = {}
    for name, cfg, ckpt in arms:
        d = osp.join(work, f'test_{name}')
        extra = ['--cfg-options', *args.cfg_options] if args.cfg_options else []
        run(['tools/test.py', cfg, ckpt, '--work-dir', d, *extra],
            osp.join(work, f'test_{name}.log'))
        metrics[name] = logged_metrics(d)
    key = next((k for k in ('coco/bbox_mAP', 'mIoU', 'accuracy/top1') if k in metrics['merged']),
               sorted(metrics['merged'])[0])

    next_stage('measuring parameters and inference time; writing the report')
    plain_p, ref_p = param_counts(baseline_cfg), param_counts(refconv_cfg)
    infer = time_inference({a[0]: (a[1], a[2]) for a in arms})  # arms[0]: the baseline
    from mmengine.config import Config
    extra_iters = Config.fromfile(refconv_cfg).get('train_cfg', {}).get('max_iters', '')
    budget = f', +{extra_iters} it' if extra_iters else ''
    cols = dict(baseline='baseline (ORIGINAL config)',
                continued=f'continued (ORIGINAL config{budget})',
                refocused=f'refocused (RefConv{budget})', merged='merged (ORIGINAL config)')
    names = [a[0] for a in arms]
    cells = dict(
        metric={n: f"{metrics[n].get(key, float('nan')):.4f}" for n in names},
        time=dict(baseline=f"{times.get('baseline', float('nan')):.0f}",
                  continued=f"{times.get('continued', float('nan')):.0f} (extra)",
                  refocused=f"{times['refocus']:.0f} (refocus)"),
        total=dict(baseline=f"{plain_p['total']:,}", continued=f"{plain_p['total']:,}",
                   refocused=f"{ref_p['total']:,}", merged=f"{plain_p['total']:,}"),
        trainable=dict(baseline=f"{plain_p['trainable']:,}",
                       continued=f"{plain_p['trainable']:,}", refocused=f"{ref_p['trainable']:,}"),
        split=dict(refocused=f"{ref_p['basis']:,} / {ref_p['refocus']:,}"),
        arch={n: ARCH[n] for n in names},
        infer={n: f"{infer['median_ms'][n]:.1f}" for n in names},
        ratio={n: 'reference' if n == names[0] else f"{infer['ratio'][n]:.2f}x" for n in names})
    labels = dict(metric='metric ' + key, time='training wall time (s)',
                  total='parameters (total)', trainable='  of which trainable',
                  split='  RefConv basis (frozen) / refocus',
                  arch='architecture at inference',
                  infer=f'inference, 1x{INFER_SIZE[0]}x{INFER_SIZE[1]} (ms, median of '
                        f'{INFER_ROUNDS} interleaved rounds)',
                  ratio='  time / baseline (median of per-round ratios)')
    rows = [(labels[r], *(cells[r].get(n, '-') for n in names)) for r in labels]
    table = ['| | ' + ' | '.join(cols[n] for n in names) + ' |',
             '| --- ' * (len(names) + 1) + '|'] + ['| ' + ' | '.join(r) + ' |' for r in rows]
    curves = {'baseline': train_curve(osp.join(work, 'baseline'))} if not args.config else {}
    if args.control:
        curves['continued (ORIGINAL config)'] = train_curve(osp.join(work, 'continued'))
    curves['refocus (RefConv)'] = train_curve(osp.join(work, 'refocus'))
    plot = osp.join(work, 'training_curves.png')
    plot_curves(plot, curves, metrics, key)
    plain = [n for n in names if ARCH[n] == ARCH['baseline']]
    spread = [infer['median_ms'][n] for n in plain]
    note = (f'Inference: {INFER_ROUNDS} rounds (after {INFER_WARMUP} warm-up rounds), each '
            'timing every model once on the same input, the order rotated every round. '
            f'{", ".join(plain)} run the same plain architecture: their medians '
            f'({min(spread):.1f}-{max(spread):.1f} ms) differ by this machine\'s noise alone. '
            'Compare models by the ratio row: each ratio divides two times of the same round, '
            'so load that changes during the measurement cancels.')
    with open(osp.join(work, 'summary.md'), 'w') as f:
        f.write('\n'.join(table) + '\n\n' + note + '\n')
    with open(osp.join(work, 'summary.json'), 'w') as f:
        json.dump(dict(metrics=metrics, times=times, params=dict(plain=plain_p, refconv=ref_p),
                       architecture={n: ARCH[n] for n in names},
                       inference_ms=infer['median_ms'], inference_ratio_to_baseline=infer['ratio'],
                       inference_rounds_ms=infer['rounds_ms'], inference_protocol=infer['protocol'],
                       checkpoints={a[0]: a[2] for a in arms}), f, indent=2)
    print('\n' + '\n'.join(table) + '\n\n' + note)
    print(f'\nDone in {time.perf_counter() - t0:.0f} s. Outputs in {work}:')
    print(f'  summary.md / summary.json   the table above\n  training_curves.png         '
          f'loss curves and {key}\n  merged.pth, merged_config.py the deployable plain model\n'
          f'  *.log                        full logs of every stage')
    return 0


if __name__ == '__main__':
    sys.exit(main())
