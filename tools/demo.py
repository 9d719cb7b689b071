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

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without the editable install
    sys.path.insert(0, ROOT)
from refconv_mm.experiments.runlogs import last_checkpoint, logged_metrics, train_curve  # noqa: E402

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


def time_inference(cfg_path: str, ckpt: str, reps: int = 10) -> float:
    """Median eval forward time (ms) of one val-sized image through the model as saved."""
    import torch
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from refconv_mm.verify import build_model, random_batch
    model = build_model(Config.fromfile(cfg_path))
    load_checkpoint(model, ckpt, map_location='cpu', logger='silent')
    x, samples = random_batch(model, (128, 128))
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            model(x, samples, mode='tensor')
            if i >= 2:  # warm-up (and RefConv's kernel cache) excluded
                times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


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
    infer = dict(plain=time_inference(baseline_cfg, base_ckpt),
                 refocused=time_inference(refconv_cfg, ref_ckpt),
                 merged=time_inference(baseline_cfg, merged))
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
        infer=dict(baseline=f"{infer['plain']:.1f}", refocused=f"{infer['refocused']:.1f} "
                   '(unmerged)', merged=f"{infer['merged']:.1f}"))
    labels = dict(metric='metric ' + key, time='training wall time (s)',
                  total='parameters (total)', trainable='  of which trainable',
                  split='  RefConv basis (frozen) / refocus',
                  infer='inference, 1x128x128 (ms, median)')
    rows = [(labels[r], *(cells[r].get(n, '-') for n in names)) for r in labels]
    table = ['| | ' + ' | '.join(cols[n] for n in names) + ' |',
             '| --- ' * (len(names) + 1) + '|'] + ['| ' + ' | '.join(r) + ' |' for r in rows]
    curves = {'baseline': train_curve(osp.join(work, 'baseline'))} if not args.config else {}
    if args.control:
        curves['continued (ORIGINAL config)'] = train_curve(osp.join(work, 'continued'))
    curves['refocus (RefConv)'] = train_curve(osp.join(work, 'refocus'))
    plot = osp.join(work, 'training_curves.png')
    plot_curves(plot, curves, metrics, key)
    with open(osp.join(work, 'summary.md'), 'w') as f:
        f.write('\n'.join(table) + '\n')
    with open(osp.join(work, 'summary.json'), 'w') as f:
        json.dump(dict(metrics=metrics, times=times, params=dict(plain=plain_p, refconv=ref_p),
                       inference_ms=infer, checkpoints={a[0]: a[2] for a in arms}), f, indent=2)
    print('\n' + '\n'.join(table))
    print(f'\nDone in {time.perf_counter() - t0:.0f} s. Outputs in {work}:')
    print(f'  summary.md / summary.json   the table above\n  training_curves.png         '
          f'loss curves and {key}\n  merged.pth, merged_config.py the deployable plain model\n'
          f'  *.log                        full logs of every stage')
    return 0


if __name__ == '__main__':
    sys.exit(main())
