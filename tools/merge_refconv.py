"""Export a refocused (RefConv) checkpoint as a plain one that the ORIGINAL config loads strictly.

    python tools/merge_refconv.py CONFIG CHECKPOINT OUT [--out-config PLAIN.py] [--verify]

CONFIG is the RefConv config the checkpoint was trained with.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config, DictAction

import refconv_mm  # noqa: F401  (registers RefConv, allows mmengine checkpoints)
from refconv_mm.checkpoint import (check_state_dict_fits, load_checkpoint_file,
                                   save_merged_checkpoint)
from refconv_mm.config import plain_config
from refconv_mm.merge import merge_state_dict, refconv_prefixes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Merge RefConv layers into plain convs')
    p.add_argument('config', help='the RefConv config the checkpoint was trained with')
    p.add_argument('checkpoint', help='the refocused checkpoint')
    p.add_argument('out', help='where to write the plain checkpoint')
    p.add_argument('--out-config', help='also write the plain config (RefConv override removed)')
    p.add_argument('--verify', action='store_true',
                   help='build both models, compare outputs on a random input, exit 1 if they '
                   'differ by more than --atol + --rtol * max|output|')
    p.add_argument('--atol', type=float, default=1e-5)
    p.add_argument('--rtol', type=float, default=1e-5)
    p.add_argument('--force', action='store_true', help='overwrite OUT / --out-config')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in the config, key=value (as mmdet tools)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from refconv_mm.verify import build_model, max_output_diff
    for path, what in ((args.out, 'OUT'), (args.out_config, '--out-config')):
        if path and osp.exists(path) and not args.force:
            raise FileExistsError(f'{what} {path!r} exists; pass --force to overwrite it')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    ckpt = load_checkpoint_file(args.checkpoint)
    state_dict = ckpt.get('state_dict', ckpt)
    if not refconv_prefixes(state_dict):
        raise ValueError(f'checkpoint {args.checkpoint!r} has no RefConv weights '
                         '(no *.refocus_weight keys): it is already plain, nothing to merge')
    model = build_model(cfg)
    check_state_dict_fits(model, state_dict, args.config, args.checkpoint)
    plain_cfg = plain_config(cfg)
    plain = build_model(plain_cfg)
    merged = merge_state_dict(state_dict)
    plain.load_state_dict(merged, strict=True)  # what the original config will do
    if args.verify:
        model.load_state_dict(state_dict, strict=True)
        diff, scale = max_output_diff(model, plain)
        tol = args.atol + args.rtol * scale
        print(f'verify: max |refocused - merged| = {diff:.3e} (tolerance {tol:.3e}, '
              f'output scale {scale:.3e})')
        if diff > tol:
            print('verify: FAILED, outputs differ beyond tolerance', file=sys.stderr)
            return 1
    n = save_merged_checkpoint(state_dict, args.out, meta=ckpt.get('meta'),
                               overwrite=args.force)
    print(f'merged {n} RefConv layers -> {args.out}')
    if args.out_config:
        plain_cfg.dump(args.out_config)
        print(f'plain config -> {args.out_config}')
    return 0


def cli() -> int:
    try:
        return main()
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f'merge_refconv: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(cli())
