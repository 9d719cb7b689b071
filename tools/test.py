"""Test (evaluate) a checkpoint of mmdet/mmseg/mmpretrain; mmdet ``tools/test.py`` arguments.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out RESULTS.pkl]
                         [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import refconv_mm  # noqa: F401
from refconv_mm.dist import launcher_env_problem, setup_distributed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Test (and eval) a model (refconv_mm)')
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='the directory to save the file containing evaluation '
                   'metrics')
    p.add_argument('--out', type=str, help='dump predictions to a pickle file for offline '
                   'evaluation')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override some settings in the used config, key=value format')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_runner(args) -> Runner:
    why = launcher_env_problem(args.launcher, 'tools/test.py')
    if why:
        print(f'tools/test.py: {why}', file=sys.stderr)
        sys.exit(2)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    # Evaluation never trains: RefConvHook's training checks do not apply.
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'RefConvHook']
    setup_distributed(cfg, args.launcher)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None:
        from mmengine.evaluator import DumpResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl file')
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    return runner


def main(argv=None) -> dict:
    return build_runner(parse_args(argv)).test()


if __name__ == '__main__':
    main()
