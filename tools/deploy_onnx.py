"""Refocused (RefConv) checkpoint -> ONNX, in one step: merge, export through mmdeploy, check.

    python tools/deploy_onnx.py CONFIG CHECKPOINT OUT.onnx [--shape H W] [--verify]

CONFIG is the RefConv config the checkpoint was trained with; the export uses the ORIGINAL
config (RefConv removed) and the merged weights, through mmdeploy's ``torch2onnx`` for ONNX
Runtime. ``--verify`` runs ONNX Runtime and PyTorch on the same input, and checks that the
graph holds exactly the plain model's convs.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys
import tempfile

from mmengine.config import Config, DictAction

import refconv_mm  # noqa: F401  (registers RefConv, allows mmengine checkpoints)
from refconv_mm.checkpoint import (check_state_dict_fits, load_checkpoint_file,
                                   save_merged_checkpoint)
from refconv_mm.config import plain_config
from refconv_mm.merge import merge_state_dict, refconv_prefixes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Merge a RefConv checkpoint and export it to ONNX '
                                '(mmdeploy, ONNX Runtime)')
    p.add_argument('config', help='the RefConv config the checkpoint was trained with')
    p.add_argument('checkpoint', help='the refocused checkpoint')
    p.add_argument('out', help='where to write the ONNX file')
    p.add_argument('--shape', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='static input size of the export (default 320 320 for mmdet/mmseg, '
                   '224 224 for mmpretrain, whose test crop mmdeploy keeps whatever is set)')
    p.add_argument('--verify', action='store_true',
                   help='run ONNX Runtime and PyTorch on the same input, exit 1 if outputs differ '
                   'by more than --atol + --rtol * max|output| or the graph has other convs than '
                   'the plain model')
    p.add_argument('--atol', type=float, default=1e-6)
    p.add_argument('--rtol', type=float, default=1e-4)
    p.add_argument('--bench', type=int, default=0, metavar='N',
                   help='also export the un-refocused basis with the ORIGINAL config (the plain '
                   'model), compare its graph, and time N ONNX Runtime runs of each, interleaved')
    p.add_argument('--save-merged', metavar='PATH', help='also keep the merged checkpoint')
    p.add_argument('--json', metavar='PATH', help='write the verify report as JSON')
    p.add_argument('--force', action='store_true', help='overwrite OUT / --save-merged / --json')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in the config, key=value (as mmdet tools)')
    return p.parse_args(argv)


def _deploy_module():
    try:
        from refconv_mm import deploy
        import mmdeploy  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ValueError(f'{e.name or e} is not installed; install the deploy stack: pip install '
                         '-r requirements/deploy.txt (tools/setup_env.sh does)') from None
    return deploy


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.out, 'OUT'), (args.save_merged, '--save-merged'),
                       (args.json, '--json')):
        if path and osp.exists(path) and not args.force:
            raise FileExistsError(f'{what} {path!r} exists; pass --force to overwrite it')
    deploy = _deploy_module()
    from refconv_mm.verify import build_model
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    codebase = deploy.codebase_of(cfg)
    shape = tuple(args.shape or ((224, 224) if codebase == 'mmpretrain' else (320, 320)))
    ckpt = load_checkpoint_file(args.checkpoint)
    state_dict = ckpt.get('state_dict', ckpt)
    if not refconv_prefixes(state_dict):
        raise ValueError(f'checkpoint {args.checkpoint!r} has no RefConv weights (no '
                         '*.refocus_weight keys): it is already plain; export it with mmdeploy '
                         'and the original config')
    check_state_dict_fits(build_model(cfg), state_dict, args.config, args.checkpoint)
    plain_cfg = plain_config(cfg)
    build_model(plain_cfg).load_state_dict(merge_state_dict(state_dict), strict=True)

    out_dir = osp.dirname(osp.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix='.' + osp.basename(args.out) + '.', dir=out_dir)
    try:
        merged = osp.join(work, 'merged.pth')
        n = save_merged_checkpoint(state_dict, merged, meta=ckpt.get('meta'))
        onnx_tmp = osp.join(work, 'end2end.onnx')
        deploy_cfg = deploy.export_onnx(plain_cfg, merged, onnx_tmp, shape)
        report = deploy.onnx_conv_report(onnx_tmp)
        # mmdeploy's mmpretrain input keeps the config's test crop (224), whatever --shape says
        print(f'merged {n} RefConv layers; exported {codebase} model, input '
              f'{"x".join(map(str, report["input_shape"]))}: {report["conv_nodes"]} Conv nodes')
        if args.verify:
            r = deploy.compare_with_pytorch(onnx_tmp, plain_cfg, merged, deploy_cfg, shape)
            tol = args.atol + args.rtol * r['scale']
            ok_convs = r['conv_nodes'] == r['torch_convs'] == r['const_weight_convs']
            print(f'verify: max |onnxruntime - pytorch| = {r["max_diff"]:.3e} (tolerance '
                  f'{tol:.3e}, output scale {r["scale"]:.3e}); Conv nodes {r["conv_nodes"]}, '
                  f'plain model conv calls {r["torch_convs"]}, with constant weights '
                  f'{r["const_weight_convs"]}')
            if args.json:
                _write_json({k: v for k, v in r.items() if k != 'input'}, args.json, args.force)
            if not r['max_diff'] <= tol or not ok_convs:
                print('verify: FAILED, ' + ('outputs differ beyond tolerance' if ok_convs else
                                            'the graph does not hold exactly the plain convs'),
                      file=sys.stderr)
                return 1
        if args.bench:
            r = _bench(deploy, plain_cfg, state_dict, ckpt.get('meta'), onnx_tmp, work, shape,
                       args.bench)
            print(f'bench: plain graph same ops and initializer shapes: {r["same_graph"]}; '
                  f'onnxruntime median latency merged {r["merged_ms"]:.2f} ms, plain '
                  f'{r["plain_ms"]:.2f} ms ({args.bench} runs x 5 rounds, interleaved)')
        if args.save_merged:
            save_merged_checkpoint(state_dict, args.save_merged, meta=ckpt.get('meta'),
                                   overwrite=args.force)
        os.replace(onnx_tmp, args.out)  # same folder: atomic
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f'onnx -> {args.out}')
    return 0


def _bench(deploy, plain_cfg, state_dict, meta, onnx_merged, work, shape, runs) -> dict:
    import numpy as np
    import torch
    from refconv_mm.merge import REFOCUS_KEY
    basis = osp.join(work, 'plain.pth')
    torch.save(dict(meta=meta or {}, state_dict={k: v for k, v in state_dict.items()
                                                 if not k.endswith(REFOCUS_KEY)}), basis)
    onnx_plain = osp.join(work, 'plain.onnx')
    deploy.export_onnx(plain_cfg, basis, onnx_plain, shape)
    a, b = deploy.onnx_conv_report(onnx_merged), deploy.onnx_conv_report(onnx_plain)
    x = np.random.RandomState(0).randn(*a['input_shape']).astype(np.float32)
    merged, plain = [], []
    for _ in range(5):  # interleaved rounds: machine load hits both alike
        merged.append(deploy.ort_latency(onnx_merged, x, runs))
        plain.append(deploy.ort_latency(onnx_plain, x, runs))
    same = a['ops'] == b['ops'] and a['initializer_shapes'] == b['initializer_shapes']
    return dict(same_graph=same, merged_ms=float(np.median(merged)),
                plain_ms=float(np.median(plain)))


def _write_json(obj: dict, path: str, overwrite: bool) -> None:
    d = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', dir=d)
    with os.fdopen(fd, 'w') as f:
        json.dump(obj, f, indent=1)
    if osp.exists(path) and not overwrite:
        os.unlink(tmp)
        raise FileExistsError(f'--json {path!r} exists; pass --force to overwrite it')
    os.replace(tmp, path)


def cli(argv=None) -> int:
    try:
        return main(argv)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f'deploy_onnx: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(cli())
