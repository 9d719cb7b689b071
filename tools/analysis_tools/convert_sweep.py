"""Sweep ``convert_to_refconv`` over the configs shipped with mmdet, mmseg and mmpretrain.

    python tools/analysis_tools/convert_sweep.py --out-dir DIR
        [--packages mmdet mmseg mmpretrain] [--per-family 1 | --all] [--match SUBSTR]
        [--size 64] [--fallback-size 224] [--timeout 600] [--rpn-proposals 100]
        [--cfg-options KEY=VALUE ...]
    python tools/analysis_tools/convert_sweep.py --configs configs/mmdet configs/mmseg --out-dir DIR

For each config (the ``.mim/configs`` folders of the installed packages, ``_base_`` skipped;
by default the first ``--per-family`` configs of every config folder, shortest file name first),
the model is built plainly (``init_cfg`` and ``pretrained`` removed, default scope set, network
refused, test-time RPN proposals capped at ``--rpn-proposals``), initialised by its own
``init_weights`` (no checkpoint) and then:

* its 2-D convs (``nn.Conv2d`` and subclasses, transposed ones apart) are counted;
* ``convert_to_refconv`` converts it; a refusal (a Conv2d subclass RefConv cannot reproduce) is
  recorded with the classes, and the rest is converted with those modules excluded;
* the zero-init RefConv model's raw outputs (``mode='tensor'``, one seeded random image of
  ``--size``, else ``--fallback-size``) must equal the plain model's (bitwise expected;
  tolerance 1e-6 * max(1, scale)); a model that cannot run a tensor forward records why;
* RefConv layers that forward never calls are listed (auxiliary heads, EMA teachers, or convs
  whose parent reads ``.weight`` directly and so ignores their refocusing);
* with small random refocusing weights, ``merge_state_dict`` and ``merge_refconv`` must give
  back exactly the plain model's state-dict keys, shapes and conv classes, and the merged model
  the RefConv model's outputs (tolerance 1e-5 * min(1, scale) + 1e-5 * scale).

``--configs PATH ...`` runs on given config files or folders instead (e.g. this plugin's
``configs/``): a RefConv config is counted for both routes, as built (``conv_cfg=RefConv`` or
``RefConvModel``) and by converting the whole plain model (``plain_config``), and the plain
model then goes through the same checks.

Prints one line per config and writes ``results.json`` and ``summary.md`` into ``--out-dir``
(rewritten after every config, so a long run can be watched).
"""
import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import os.path as osp
import random
import signal
import socket
import sys
import time
import traceback
import warnings
from collections import Counter, OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

# The sweep must never download: model hubs are told so before anything imports them.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

import refconv_mm  # noqa: E402,F401  (registers RefConv and RefConvModel)
from refconv_mm import RefConv2d, convert_to_refconv, merge_refconv, merge_state_dict  # noqa: E402
from refconv_mm.config import is_refconv_cfg, is_refconv_model_cfg, plain_config  # noqa: E402
from refconv_mm.convert import REFCONV_FOR  # noqa: E402
from refconv_mm.verify import build_model, flat_outputs, random_batch  # noqa: E402

PACKAGES = ('mmdet', 'mmseg', 'mmpretrain')
ZERO_RTOL = 1e-6  # zero-init RefConv vs plain: |diff| <= ZERO_RTOL * max(1, scale)
# Merged vs RefConv: |diff| <= atol * min(1, scale) + rtol * scale (an atol that shrinks with
# outputs below 1, as tests/test_convert.py: bitwise equality is expected anyway).
MERGE_ATOL, MERGE_RTOL = 1e-5, 1e-5
REFOCUS_SCALE = 1e-3  # random refocusing weights move each kernel by about this fraction


class NetworkRefused(OSError):
    """Raised instead of opening a network connection (the sweep runs offline)."""


class ConfigTimeout(Exception):
    """One config ran past ``--timeout``."""


def refuse_network() -> None:
    """Make every TCP/UDP connection fail at once, so a config that downloads is skipped."""
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkRefused(f'network refused by convert_sweep (tried {address!r})')
        return real_connect(self, address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (mmdet tool conventions)."""
    p = argparse.ArgumentParser(
        description='Convert every model of the installed mmdet/mmseg/mmpretrain configs (or of '
        'given configs) to RefConv and back, and check outputs and keys')
    p.add_argument('--out-dir', required=True, help='where results.json and summary.md go')
    p.add_argument('--packages', nargs='+', default=list(PACKAGES), choices=PACKAGES,
                   help='packages whose shipped configs are swept')
    p.add_argument('--configs', nargs='+', metavar='PATH',
                   help='sweep these config files / folders instead of the packages\' configs')
    p.add_argument('--per-family', type=int, default=1,
                   help='configs per config folder (model family), shortest file name first')
    p.add_argument('--all', action='store_true', help='every config (ignores --per-family)')
    p.add_argument('--match', help='only configs whose path contains this substring')
    p.add_argument('--size', type=int, default=64, help='input height and width')
    p.add_argument('--fallback-size', type=int, default=224,
                   help='input size tried when --size fails (0: none)')
    p.add_argument('--timeout', type=int, default=600, help='seconds per config (0: none)')
    p.add_argument('--rpn-proposals', type=int, default=100,
                   help='cap on test-time RPN proposals of two-stage detectors (0: as configured)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--allow-network', action='store_true',
                   help='let configs download (by default every connection is refused)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in every config, key=value (as mmdet tools)')
    args = p.parse_args(argv)
    if args.per_family < 1:
        p.error('--per-family must be >= 1')
    return args


# -- config discovery ----------------------------------------------------------------------
def package_config_root(package: str) -> str:
    """The ``.mim/configs`` folder of an installed OpenMMLab package."""
    module = __import__(package)
    return osp.join(osp.dirname(module.__file__), '.mim', 'configs')


def _config_files(root: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != '_base_' and not d.startswith('.'))
        found += [osp.join(dirpath, f) for f in filenames if f.endswith('.py')]
    return sorted(found)


def package_configs(package: str, per_family: Optional[int],
                    match: Optional[str]) -> List[Tuple[str, str, str]]:
    """``(path, package, family)`` of the package's configs; ``per_family`` per folder.

    A family is a config's folder relative to the configs root; its configs are taken
    shortest file name first (usually the family's plain base model).
    """
    root = package_config_root(package)
    families: Dict[str, List[str]] = OrderedDict()
    for path in _config_files(root):
        rel = osp.relpath(path, root)
        if match and match not in osp.join(package, rel):
            continue
        families.setdefault(osp.dirname(rel), []).append(path)
    chosen = []
    for family, paths in families.items():
        paths = sorted(paths, key=lambda p: (len(osp.basename(p)), osp.basename(p)))
        chosen += [(p, package, family) for p in paths[:per_family or None]]
    return chosen


def given_configs(paths: Sequence[str], match: Optional[str]) -> List[Tuple[str, str, str]]:
    """``(path, 'given', family)`` for config files and every config under given folders."""
    chosen = []
    for path in paths:
        files = _config_files(path) if osp.isdir(path) else [path]
        if not files:
            raise FileNotFoundError(f'no config under {path!r}')
        for f in files:
            if not match or match in f:
                chosen.append((f, 'given', osp.basename(osp.dirname(osp.abspath(f)))))
    return chosen


# -- model preparation -----------------------------------------------------------------------
def strip_pretrained(node: Any) -> Any:
    """``node`` with every ``init_cfg`` removed and ``pretrained`` off, so nothing downloads."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == 'init_cfg':
                out[k] = None
            elif k == 'pretrained' and isinstance(v, (str, bool)):
                out[k] = False if isinstance(v, bool) else None
            else:
                out[k] = strip_pretrained(v)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(strip_pretrained(v) for v in node)
    return node


def prepare(cfg: Config, package: str, rpn_proposals: int = 0) -> Config:
    """A copy of ``cfg`` ready to build offline: no pretrained weights, a default scope,
    and at most ``rpn_proposals`` RPN proposals per image at test time (0: as configured)."""
    d = cfg.to_dict()
    d['model'] = strip_pretrained(d['model'])
    rpn = (d['model'].get('test_cfg') or {}).get('rpn')
    if rpn_proposals and isinstance(rpn, dict):
        # 'tensor' mode runs the RoI heads on every proposal: 1000 of them dominate the sweep.
        for key, n in (('max_per_img', rpn_proposals), ('nms_pre', 5 * rpn_proposals)):
            if isinstance(rpn.get(key), int):
                rpn[key] = min(rpn[key], n)
    if not d.get('default_scope'):
        d['default_scope'] = package if package in PACKAGES else 'mmdet'
    return Config(d)


def conv_counts(model: nn.Module) -> Dict[str, Any]:
    """Counts of a model's conv modules (each module once, shared ones included)."""
    counts = Counter()
    others = Counter()
    for m in model.modules():
        if isinstance(m, RefConv2d):
            counts['refconv'] += 1
        elif isinstance(m, nn.Conv2d):
            counts['conv2d_plain'] += 1
        elif isinstance(m, nn.ConvTranspose2d):
            counts['conv_transpose2d'] += 1
        elif isinstance(getattr(m, '_parameters', {}).get('weight'), torch.Tensor) and \
                m._parameters['weight'].dim() == 4:
            others[type(m).__name__] += 1  # conv-like (deformable, ...): not a Conv2d
    return dict(conv2d=counts['refconv'] + counts['conv2d_plain'], refconv=counts['refconv'],
                conv2d_plain=counts['conv2d_plain'], conv_transpose2d=counts['conv_transpose2d'],
                other_4d_weight=dict(others))


def unsupported_convs(model: nn.Module) -> Dict[str, str]:
    """``{module name: class path}`` of the Conv2d subclasses convert_to_refconv refuses."""
    return {n: f'{type(m).__module__}.{type(m).__qualname__}' for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not isinstance(m, RefConv2d)
            and type(m) not in REFCONV_FOR}


def randomize_refocus(model: nn.Module, seed: int) -> None:
    """Small random refocusing weights: each kernel moves by about REFOCUS_SCALE of itself."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConv2d):
                w = m.refocus_weight
                fan_in = w.shape[1] * w.shape[2] * w.shape[3]
                w.copy_(torch.randn(w.shape, generator=g).to(w) * (REFOCUS_SCALE / fan_in ** 0.5))


# -- forward and comparison ------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Same RNG state before every forward: models that sample in eval (MAE) stay comparable."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@torch.no_grad()
def tensor_outputs(model: nn.Module, size: int, seed: int) -> List[torch.Tensor]:
    """The flat raw outputs of ``model(x, samples, mode='tensor')`` on a seeded image."""
    model.eval()
    x, samples = random_batch(model, (size, size), seed=seed)
    seed_everything(seed)
    outs = flat_outputs(model(x, samples, mode='tensor'))
    if not outs:
        raise RuntimeError("mode='tensor' returned no tensor")
    return [o.detach().clone() for o in outs]


def compare(a: List[torch.Tensor], b: List[torch.Tensor]) -> Tuple[float, float]:
    """``(max |a - b|, max finite |b|)``; equal non-finite entries count as equal."""
    if len(a) != len(b):
        return float('inf'), 0.0
    diff, scale = 0.0, 0.0
    for ta, tb in zip(a, b):
        if ta.shape != tb.shape:
            return float('inf'), scale
        ta, tb = ta.double(), tb.double()
        d = (ta - tb).abs()
        d[(ta == tb) | (ta.isnan() & tb.isnan())] = 0
        d = torch.nan_to_num(d, nan=float('inf'))
        diff = max(diff, d.max().item() if d.numel() else 0.0)
        finite = tb[torch.isfinite(tb)]
        scale = max(scale, finite.abs().max().item() if finite.numel() else 0.0)
    return diff, scale


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    msg = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {msg[0] if msg else ""}'[:300]


def skip_kind(exc: BaseException) -> str:
    """Why a config could not be built: 'offline', 'missing package' or 'build'."""
    text = f'{type(exc).__name__} {exc}'.lower()
    if isinstance(exc, NetworkRefused) or any(
            w in text for w in ('network refused', 'offline', 'connect', 'huggingface', 'url')):
        return 'offline'
    if isinstance(exc, ImportError) or 'not installed' in text or 'pip install' in text:
        return 'missing package'
    return 'build'


def state_shapes(model: nn.Module) -> 'OrderedDict[str, tuple]':
    """``{key: shape}`` of the model's state dict, in order."""
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def conv_classes(model: nn.Module) -> Dict[str, type]:
    """``{name: class}`` of every 2-D conv of the model."""
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included, unlike ``torch.equal``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def outputs_and_idle_refconvs(model: nn.Module, size: int,
                              seed: int) -> Tuple[List[torch.Tensor], List[str]]:
    """The tensor outputs, and the names of the RefConv layers that forward never called."""
    called = set()
    handles = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod)))
               for m in model.modules() if isinstance(m, RefConv2d)]
    try:
        outs = tensor_outputs(model, size, seed)
    finally:
        for h in handles:
            h.remove()
    return outs, [n for n, m in model.named_modules()
                  if isinstance(m, RefConv2d) and id(m) not in called]


def check_model(model: nn.Module, rec: Dict[str, Any], sizes: List[int], seed: int) -> None:
    """Convert ``model`` (plain, eval) in place, check outputs, merge back; fill ``rec``."""
    rec['params_m'] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    before = conv_counts(model)
    rec.update(conv2d=before['conv2d'], conv_transpose2d=before['conv_transpose2d'],
               other_4d_weight=before['other_4d_weight'])
    rec['stage'] = 'init_weights'
    try:
        # The package's own init: no uninitialised (torch.empty) parameters whose garbage
        # (NaN) would make bitwise checks flaky, and outputs that depend on every layer.
        model.init_weights()
    except Exception as exc:  # noqa: BLE001 (torch's default init is kept; recorded)
        rec['init_weights'] = first_line(exc)
    model.eval()
    plain_classes = conv_classes(model)
    rec['stage'] = 'plain forward'
    plain_out, errors = None, []
    for size in sizes:
        try:
            plain_out = tensor_outputs(model, size, seed)
            rec['size'] = size
            break
        except ConfigTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 (any model may fail; recorded)
            errors.append(f'{size}: {first_line(exc)}')
    if plain_out is None:
        rec['output_check'] = dict(status='skipped', reason='; '.join(errors))
    # After the forward: some models size buffers to the input (EVA-02's RoPE tables).
    plain_keys = state_shapes(model)
    if not before['conv2d']:
        rec.update(refconv=0, left_plain=0, converted_fully=False, stage='done')
        return

    rec['stage'] = 'convert'
    refused = unsupported_convs(model)
    try:
        convert_to_refconv(model)
    except ValueError as exc:
        if not refused:
            raise
        rec['refusal'] = first_line(exc)
        rec['refused_classes'] = dict(Counter(refused.values()))
        rec['refused_modules'] = sorted(refused)[:10]
        # The rest of the model is still converted and checked.
        try:
            convert_to_refconv(model, exclude=sorted(refused))
        except ValueError as exc2:
            rec['convert_rest'] = first_line(exc2)
    after = conv_counts(model)
    rec.update(refconv=after['refconv'], left_plain=after['conv2d_plain'],
               converted_fully=after['conv2d_plain'] == 0 and after['refconv'] > 0)
    if plain_out is not None and after['refconv']:
        rec['stage'] = 'zero-init forward'
        ref0_out, idle = outputs_and_idle_refconvs(model, rec['size'], seed)
        if idle:  # a parent reads their .weight (the basis) instead of running them
            rec.update(refconv_not_run=idle[:10], refconv_not_run_count=len(idle))
        diff, scale = compare(ref0_out, plain_out)
        ok = diff <= ZERO_RTOL * max(1.0, scale)
        rec['output_check'] = dict(status='equal' if diff == 0 else 'close' if ok else 'differ',
                                   zero_init_diff=diff, scale=scale)

    rec['stage'] = 'merge'
    randomize_refocus(model, seed)
    ref_out = tensor_outputs(model, rec['size'], seed) if plain_out is not None else None
    merged_sd = merge_state_dict(model.state_dict())
    merge_refconv(model)
    merged_keys, merged_classes = state_shapes(model), conv_classes(model)
    changed = {n: f'{plain_classes.get(n)} -> {merged_classes.get(n)}'
               for n in set(plain_classes) | set(merged_classes)
               if plain_classes.get(n) is not merged_classes.get(n)}
    rec['merge'] = dict(
        keys_equal=list(merged_keys) == list(plain_keys),
        shapes_equal=dict(merged_keys) == dict(plain_keys),
        classes_restored=not changed,
        classes_changed=dict(sorted(changed.items())[:5]),
        no_refconv_left=not any(isinstance(m, RefConv2d) for m in model.modules()),
        state_dict_route_equal=(list(merged_sd) == list(plain_keys) and all(
            same_bits(merged_sd[k], v) for k, v in model.state_dict().items())))
    if ref_out is not None:
        rec['stage'] = 'merged forward'
        diff, scale = compare(tensor_outputs(model, rec['size'], seed), ref_out)
        moved, _ = compare(ref_out, plain_out)  # how far the random refocusing moved outputs
        rec['merge'].update(merged_diff=diff, scale=scale, refocus_moved=moved,
                            outputs_equal=diff <= MERGE_ATOL * min(1.0, scale) + MERGE_RTOL * scale)
    rec['stage'] = 'done'


def model_route(cfg: Config) -> str:
    """How a config applies RefConv: 'RefConvModel', 'conv_cfg' or 'plain'."""
    if is_refconv_model_cfg(cfg.get('model')):
        return 'RefConvModel'

    def has_refconv(node) -> bool:
        if isinstance(node, dict):
            return any((k == 'conv_cfg' and is_refconv_cfg(v)) or has_refconv(v)
                       for k, v in node.items())
        return isinstance(node, (list, tuple)) and any(has_refconv(v) for v in node)

    return 'conv_cfg' if has_refconv(cfg.to_dict().get('model')) else 'plain'


def run_config(path: str, package: str, family: str, args: argparse.Namespace) -> Dict:
    """Load, build, convert and check one config; every outcome is a record, never a raise."""
    rec: Dict[str, Any] = dict(config=path, package=package, family=family, status='ok',
                               stage='load')
    sizes = [args.size] + ([args.fallback_size] if args.fallback_size
                           and args.fallback_size != args.size else [])
    t0 = time.time()
    model = None
    try:
        with time_limit(args.timeout):
            try:
                cfg = Config.fromfile(path)
            except (ConfigTimeout, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 (e.g. custom_imports of a project)
                rec.update(status='skipped', skip_kind=skip_kind(exc), reason=first_line(exc))
                return rec
            if args.cfg_options:
                cfg.merge_from_dict(args.cfg_options)
            if not isinstance(cfg.get('model'), dict):
                rec.update(status='skipped', skip_kind='no model',
                           reason='the config defines no model')
                return rec
            if package == 'given':
                rec['route'] = model_route(cfg)
                if rec['route'] != 'plain':
                    rec['stage'] = 'build as configured'
                    built = build_model(prepare(cfg, package, args.rpn_proposals))
                    rec['refconv_as_built'] = conv_counts(built)['refconv']
                    del built
                cfg = plain_config(cfg)
            rec['stage'] = 'build'
            try:
                model = build_model(prepare(cfg, package, args.rpn_proposals))
            except (ConfigTimeout, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 (recorded as a skip)
                rec.update(status='skipped', skip_kind=skip_kind(exc), reason=first_line(exc))
                return rec
            if package == 'given':
                refused = sorted(unsupported_convs(model)) or None
                try:
                    spatial = convert_to_refconv(copy.deepcopy(model), exclude=refused,
                                                 spatial_only=True)
                    rec['refconv_whole_model_spatial_only'] = conv_counts(spatial)['refconv']
                    del spatial
                except ValueError:  # nothing left to convert
                    rec['refconv_whole_model_spatial_only'] = 0
            check_model(model, rec, sizes, args.seed)
            if package == 'given':
                rec['refconv_whole_model'] = rec['refconv']
            rec['status'] = verdict(rec)
    except ConfigTimeout:
        rec.update(status='failed', reason=f'timeout after {args.timeout}s in {rec["stage"]}')
    except Exception as exc:  # noqa: BLE001 (a failure of the conversion itself: recorded)
        rec.update(status='failed', reason=f'{rec["stage"]}: {first_line(exc)}',
                   traceback=traceback.format_exc(limit=-4))
    finally:
        rec['seconds'] = round(time.time() - t0, 1)
        del model
        gc.collect()
    return rec


def verdict(rec: Dict[str, Any]) -> str:
    """'ok', 'no conv2d', 'refused' (convs left plain by necessity) or 'failed' (a check
    failed: named in ``rec['failed_checks']``)."""
    if rec.get('conv2d') == 0:
        return 'no conv2d'
    merge = rec.get('merge', {})
    failed = [k for k in ('keys_equal', 'shapes_equal', 'classes_restored', 'no_refconv_left',
                          'state_dict_route_equal', 'outputs_equal') if not merge.get(k, True)]
    if rec.get('output_check', {}).get('status') == 'differ':
        failed.insert(0, 'zero_init_outputs')
    if failed:
        rec['failed_checks'] = failed
        return 'failed'
    return 'refused' if rec.get('refused_classes') else 'ok'


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`ConfigTimeout` in the main thread after ``seconds`` (0: no limit)."""
    if not seconds:
        yield
        return

    def _raise(signum, frame):
        raise ConfigTimeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- reporting -------------------------------------------------------------------------------
def progress_line(i: int, n: int, rec: Dict[str, Any]) -> str:
    """One line per config: status, counts, output diffs, time."""
    name = rec['config'] if rec['package'] == 'given' else osp.join(
        rec['package'], rec['family'], osp.basename(rec['config']))
    parts = [f'[{i}/{n}] {name}: {rec["status"]}']
    if 'conv2d' in rec:
        parts.append(f'conv2d={rec["conv2d"]} refconv={rec.get("refconv")}'
                     + (f' left_plain={rec["left_plain"]}' if rec.get('left_plain') else ''))
    if 'refconv_as_built' in rec:
        parts.append(f'as_built={rec["refconv_as_built"]}')
    oc = rec.get('output_check', {})
    if 'zero_init_diff' in oc:
        parts.append(f'zero_diff={oc["zero_init_diff"]:.2g}')
    elif oc:
        parts.append('outputs skipped')
    if 'merged_diff' in rec.get('merge', {}):
        parts.append(f'merged_diff={rec["merge"]["merged_diff"]:.2g}')
    if rec.get('refused_classes'):
        parts.append('refused ' + ','.join(c.rsplit('.', 1)[-1] for c in rec['refused_classes']))
    if rec.get('failed_checks'):
        parts.append('failed checks: ' + ','.join(rec['failed_checks']))
    if rec.get('reason'):
        parts.append(f'({rec["reason"][:120]})')
    parts.append(f'{rec.get("seconds", 0):.1f}s')
    return ' '.join(parts)


def totals(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per package: configs tried / built / converted fully / refused / output-checked / ..."""
    out: Dict[str, Dict[str, int]] = OrderedDict()
    for pkg in sorted({r['package'] for r in records}) + ['all']:
        rs = [r for r in records if pkg in ('all', r['package'])]
        built = [r for r in rs if 'conv2d' in r]
        out[pkg] = dict(
            tried=len(rs), built=len(built),
            converted_fully=sum(bool(r.get('converted_fully')) for r in rs),
            refused=sum(bool(r.get('refused_classes')) for r in rs),
            no_conv2d=sum(r.get('conv2d') == 0 for r in built),
            outputs_checked=sum('zero_init_diff' in r.get('output_check', {}) for r in rs),
            outputs_skipped=sum(r.get('output_check', {}).get('status') == 'skipped'
                                for r in rs),
            failed=sum(r['status'] == 'failed' for r in rs),
            skipped=sum(r['status'] == 'skipped' for r in rs),
            conv2d=sum(r.get('conv2d', 0) for r in built),
            refconv=sum(r.get('refconv', 0) or 0 for r in built))
    return out


def refused_classes(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{class: {configs, modules, examples}}`` over every refusal."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in records:
        for cls, n in (r.get('refused_classes') or {}).items():
            e = out.setdefault(cls, dict(configs=0, modules=0, examples=[]))
            e['configs'] += 1
            e['modules'] += n
            if len(e['examples']) < 3:
                e['examples'].append(osp.basename(r['config']))
    return out


def summary_markdown(records: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The markdown summary: totals, refused classes, skips, failures, per-config table."""
    lines = ['# convert_to_refconv sweep', '',
             f'{meta["command"]}', '',
             f'Input {meta["size"]}x{meta["size"]} (fallback {meta["fallback_size"]}); '
             f'wall time {meta.get("wall_s", 0):.0f} s; torch {torch.__version__}.', '',
             '## Totals', '',
             '| package | tried | built | converted fully | refused | no Conv2d | '
             'outputs checked | outputs skipped | skipped | failed | Conv2d | RefConv |',
             '| --- | ' + '--- | ' * 11]
    for pkg, t in totals(records).items():
        lines.append(f'| {pkg} | ' + ' | '.join(str(t[k]) for k in (
            'tried', 'built', 'converted_fully', 'refused', 'no_conv2d', 'outputs_checked',
            'outputs_skipped', 'skipped', 'failed', 'conv2d', 'refconv')) + ' |')
    lines += ['', '## Refused Conv2d subclasses', '']
    refused = refused_classes(records)
    if refused:
        lines += ['| class | configs | modules | e.g. |', '| --- | --- | --- | --- |']
        lines += [f'| `{c}` | {e["configs"]} | {e["modules"]} | {", ".join(e["examples"])} |'
                  for c, e in sorted(refused.items(), key=lambda kv: -kv[1]['configs'])]
    else:
        lines.append('None.')
    others = Counter()
    for r in records:
        others.update({k: 1 for k in r.get('other_4d_weight') or {}})
    if others:
        lines += ['', 'Conv-like modules that are not `nn.Conv2d` (never converted), configs: '
                  + ', '.join(f'`{c}` {n}' for c, n in others.most_common()) + '.']
    for title, status in (('Failed', 'failed'), ('Skipped', 'skipped')):
        rs = [r for r in records if r['status'] == status]
        if rs:
            lines += ['', f'## {title} ({len(rs)})', '']
            lines += [f'- `{osp.basename(r["config"])}` ({r.get("skip_kind", r.get("stage"))}): '
                      f'{r.get("reason") or ", ".join(r.get("failed_checks", []))}'
                      + (f'; merged diff {r["merge"]["merged_diff"]:.2g} (scale '
                         f'{r["merge"]["scale"]:.2g})' if 'merged_diff' in r.get('merge', {})
                         else '')
                      + (f'; never run: {", ".join(r["refconv_not_run"])}'
                         if r.get('refconv_not_run') else '') for r in rs]
    idle = [r for r in records if r.get('refconv_not_run')]
    if idle:
        lines += ['', f'## RefConv layers the tensor forward never runs ({len(idle)} configs)', '',
                  'Converted, but never called in `tensor` mode: auxiliary heads, EMA teachers, '
                  'momentum encoders, or convs whose parent reads `.weight` (the basis) instead '
                  'of running them (see Failed). Configs (layers): '
                  + ', '.join(f'`{osp.basename(r["config"])}` '
                              f'({r.get("refconv_not_run_count", len(r["refconv_not_run"]))})'
                              for r in idle) + '.']
    skipped_out = [r for r in records if r.get('output_check', {}).get('status') == 'skipped']
    if skipped_out:
        lines += ['', f'## Output check skipped ({len(skipped_out)})', '']
        lines += [f'- `{osp.basename(r["config"])}`: {r["output_check"]["reason"][:300]}'
                  for r in skipped_out]
    given = any(r['package'] == 'given' for r in records)
    lines += ['', '## Per config', '']
    head = ['config', 'status', 'Conv2d', 'RefConv', 'left plain', 'zero-init diff',
            'merged diff', 's']
    if given:
        head[4:4] = ['route', 'as built', 'whole model', 'whole, spatial_only']
    lines += ['| ' + ' | '.join(head) + ' |', '| ' + '--- | ' * len(head)]
    for r in records:
        oc, mg = r.get('output_check', {}), r.get('merge', {})
        name = osp.relpath(r['config']) if given else osp.join(r['family'],
                                                               osp.basename(r['config']))
        row = [f'`{name}`', r['status'], r.get('conv2d', ''), r.get('refconv', ''),
               r.get('left_plain', ''),
               f'{oc["zero_init_diff"]:.2g}' if 'zero_init_diff' in oc else oc.get('status', ''),
               f'{mg["merged_diff"]:.2g}' if 'merged_diff' in mg else '',
               r.get('seconds', '')]
        if given:
            row[4:4] = [r.get('route', ''), r.get('refconv_as_built', ''),
                        r.get('refconv_whole_model', ''),
                        r.get('refconv_whole_model_spatial_only', '')]
        lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
    return '\n'.join(lines) + '\n'


def write_reports(out_dir: str, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """(Re)write results.json and summary.md."""
    data = dict(meta, totals=totals(records), refused_classes=refused_classes(records),
                results=records)
    tmp = osp.join(out_dir, 'results.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, osp.join(out_dir, 'results.json'))
    with open(osp.join(out_dir, 'summary.md'), 'w') as f:
        f.write(summary_markdown(records, meta))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the sweep; returns 1 if any config failed a check, else 0."""
    args = parse_args(argv)
    if not args.allow_network:
        refuse_network()
    # Hundreds of models' deprecation warnings and init logs would bury the line per config.
    warnings.simplefilter('ignore')
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.configs:
        todo = given_configs(args.configs, args.match)
    else:
        todo = [c for pkg in args.packages
                for c in package_configs(pkg, None if args.all else args.per_family, args.match)]
    cli = list(sys.argv[1:] if argv is None else argv)
    meta = dict(command=' '.join(['python tools/analysis_tools/convert_sweep.py'] + cli),
                size=args.size, fallback_size=args.fallback_size, seed=args.seed,
                started=time.strftime('%Y-%m-%d %H:%M:%S'))
    print(f'{len(todo)} configs', flush=True)
    records: List[Dict[str, Any]] = []
    t0 = time.time()
    for i, (path, package, family) in enumerate(todo, 1):
        rec = run_config(path, package, family, args)
        records.append(rec)
        print(progress_line(i, len(todo), rec), flush=True)
        meta['wall_s'] = time.time() - t0
        write_reports(args.out_dir, records, meta)
    for pkg, t in totals(records).items():
        print(f'{pkg}: ' + ', '.join(f'{k}={v}' for k, v in t.items()), flush=True)
    print(f'wall time {meta["wall_s"]:.0f} s; results in {args.out_dir}', flush=True)
    return int(any(r['status'] == 'failed' for r in records))


if __name__ == '__main__':
    sys.exit(main())
