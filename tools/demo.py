"""The main job, one command: baseline -> refocus (RefConv) -> merge -> evaluate -> report.

    python tools/demo.py                       # embedded default: generated shapes data
    python tools/demo.py --config MY_REFCONV_CFG.py --checkpoint MY_TRAINED.pth

Default: deterministically generates a small COCO-format shapes set, trains an
mmdet RetinaNet-R18-FPN with the ORIGINAL installed config (data adapted),
refocus-trains it with the one-line RefConv override and RefConvHook, merges
with tools/merge_refconv.py, evaluates baseline / refocused / merged, prints a
table and writes training-curve plots. With --config/--checkpoint the baseline
stage is skipped and your RefConv config is refocus-trained from your checkpoint.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='refconv_mm end-to-end demo')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'outputs', 'demo'),
                   help='where data, checkpoints, logs, table and plots go')
    p.add_argument('--config', help='your RefConv config (skips data generation and baseline)')
    p.add_argument('--checkpoint', help='the trained checkpoint your RefConv config starts from')
    p.add_argument('--baseline-config', help='with --config: the ORIGINAL config, to evaluate '
                   'the baseline and the merged model with it (default: derived by removing '
                   'the RefConv override)')
    p.add_argument('--iters', type=int, default=400, help='baseline training iterations')
    p.add_argument('--refocus-iters', type=int, default=200, help='refocus training iterations')
    p.add_argument('--seed', type=int, default=0, help='data and training seed')
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
            if any(k in line for k in ('Iter(train)', 'Iter(val)', 'Iter(test)', 'RefConvHook',
                                       'bbox_mAP', 'mIoU', 'verify:', 'merged ', 'Error',
                                       'error', 'Traceback')):
                print('    ' + line.rstrip()[-160:], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f'{args[0]} failed (exit {proc.returncode}); full log: {log_path}')
    return time.perf_counter() - t0
