"""Train (refocus-train) a detector, segmentor or classifier; mmdet ``tools/train.py`` arguments.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

Multi-process: ``torchrun --nproc_per_node N tools/train.py CONFIG --launcher pytorch``
(CUDA: NCCL as in mmdet; no CUDA: gloo with a device-less DDP wrapper).
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import refconv_mm  # noqa: F401  (RefConv, RefConvHook, checkpoint loading)
from refconv_mm.dist import launcher_env_problem, setup_distributed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a detector / segmentor / classifier (refconv_mm)')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--amp', action='store_true', help='enable automatic-mixed-precision training')
    p.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from the given checkpoint, or from the latest one in work_dir')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override some settings in the used config, key=value format')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def amp_unavailable(cfg) -> str:
    """Why the config's ``AmpOptimWrapper`` cannot run on this machine ('' when it can)."""
    if cfg.get('optim_wrapper', {}).get('type') != 'AmpOptimWrapper':
        return ''
    import mmengine.device as device
    checks = ('is_cuda_available', 'is_npu_available', 'is_mlu_available', 'is_musa_available')
    if any(getattr(device, c, lambda: False)() for c in checks):
        return ''
    return ('mixed precision (--amp, AmpOptimWrapper) needs a CUDA, NPU, MLU or MUSA device '
            'and this machine has none: mmengine refuses it on a CPU. Train without --amp '
            '(fp32), or on a GPU machine.')


def build_runner(args) -> Runner:
    why = launcher_env_problem(args.launcher, 'tools/train.py')
    if why:
        print(f'tools/train.py: {why}', file=sys.stderr)
        sys.exit(2)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    why = amp_unavailable(cfg)
    if why:
        print(f'tools/train.py: {why}', file=sys.stderr)
        sys.exit(2)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('Can not find "auto_scale_lr" or "auto_scale_lr.base_batch_size" '
                               'in your configuration file.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    setup_distributed(cfg, args.launcher)
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def main(argv=None):
    build_runner(parse_args(argv)).train()


if __name__ == '__main__':
    main()
