"""Analyse a refocused (RefConv) checkpoint: how far refocusing moved each kernel.

    python tools/analysis_tools/refocus_analysis.py CHECKPOINT [--baseline BASELINE_CKPT]
        [--out-dir DIR] [--layers REGEX] [--max-layers N] [--max-kernels N] [--force]

For every RefConv layer (a ``<prefix>refocus_weight`` beside the basis
``<prefix>weight`` = ``W_b``) the refocused kernel ``W = W_b + T(W_b)`` is
computed with :func:`refconv_mm.refocus.refocus_kernel`, and reported:

* relative kernel change ``||W - W_b||_F / ||W_b||_F``;
* kernel skeleton: mean ``|W|`` per kernel position (a ``kh x kw`` map, averaged
  over output channels and input channels per group), before (``W_b``) and after (``W``);
* channel redundancy: the SIGNED mean of the off-diagonal pairwise cosine
  similarities between the flattened output kernels ``W[o]`` (an all-zero kernel
  has cosine 0 with everything), before and after. Layers with more than
  ``--max-kernels`` output channels use that many output kernels, evenly spaced
  over ``o`` (deterministic).

Writes ``relative_change.png``, ``skeletons.png``, ``redundancy.png`` and
``refocus_analysis.json`` into ``--out-dir`` and prints a per-layer table.
"""
import argparse
import json
import math
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from refconv_mm.checkpoint import load_checkpoint_file
from refconv_mm.merge import REFOCUS_KEY, refconv_prefixes
from refconv_mm.refocus import refocus_kernel

PROG = 'refocus_analysis'
OUT_FILES = ('relative_change.png', 'skeletons.png', 'redundancy.png', 'refocus_analysis.json')
REDUNDANCY_DEF = ('signed mean of the off-diagonal pairwise cosine similarities between the '
                  'flattened output kernels W[o]')


# -- analysis ------------------------------------------------------------------
def layer_name(prefix: str) -> str:
    """Readable layer name of a state-dict prefix (`'backbone.conv1.'` -> `'backbone.conv1'`)."""
    return prefix[:-1] if prefix.endswith('.') else (prefix or '<root>')


def relative_change(basis: torch.Tensor, kernel: torch.Tensor) -> float:
    """``||kernel - basis||_F / ||basis||_F`` (``nan`` for an all-zero basis)."""
    ref = torch.linalg.vector_norm(basis.double()).item()
    diff = torch.linalg.vector_norm(kernel.double() - basis.double()).item()
    return diff / ref if ref > 0 else float('nan')


def kernel_skeleton(kernel: torch.Tensor) -> torch.Tensor:
    """Mean ``|kernel|`` per kernel position: a ``(kh, kw)`` map over ``(Cout, Cin/g)``."""
    return kernel.double().abs().mean(dim=(0, 1))


def subsample_indices(n: int, max_n: int) -> torch.Tensor:
    """At most ``max_n`` indices evenly spread over ``range(n)``, always the same ones."""
    if n <= max_n:
        return torch.arange(n)
    return torch.unique(torch.linspace(0, n - 1, max_n).round().long())


def channel_redundancy(kernel: torch.Tensor, max_kernels: int = 512) -> float:
    """Signed mean off-diagonal cosine similarity between the flattened output kernels.

    ``kernel`` is ``(Cout, Cin/g, kh, kw)``; with more than ``max_kernels`` output
    kernels an evenly spaced subset is used. Returns ``nan`` for fewer than 2.
    """
    idx = subsample_indices(kernel.shape[0], max_kernels)
    m = len(idx)
    if m < 2:
        return float('nan')
    # float64 so that the mean over ~m^2 entries does not drift.
    rows = F.normalize(kernel[idx].reshape(m, -1).double(), dim=1)
    gram = rows @ rows.T
    return ((gram.sum() - gram.diagonal().sum()) / (m * (m - 1))).item()


def analyse_layer(basis: torch.Tensor, refocus_weight: torch.Tensor,
                  max_kernels: int = 512) -> Dict:
    """Statistics of one RefConv layer (without its name): shapes, change, skeletons, redundancy."""
    dtype = torch.promote_types(basis.dtype, torch.float64)
    # The math lives in refocus_kernel; only the dtype is chosen here (fp64 for the statistics).
    kernel = refocus_kernel(basis.to(dtype), refocus_weight.to(dtype))
    return dict(
        kernel_shape=list(basis.shape),
        groups=int(refocus_weight.shape[1]),
        refocus_shape=list(refocus_weight.shape),
        rel_change=relative_change(basis, kernel),
        redundancy_before=channel_redundancy(basis, max_kernels),
        redundancy_after=channel_redundancy(kernel, max_kernels),
        redundancy_kernels=int(len(subsample_indices(basis.shape[0], max_kernels))),
        skeleton_before=kernel_skeleton(basis).tolist(),
        skeleton_after=kernel_skeleton(kernel).tolist(),
    )


def state_dict_of(ckpt: Mapping) -> Mapping[str, torch.Tensor]:
    """The state dict of an mmengine checkpoint dict, or ``ckpt`` itself if it is a bare one."""
    sd = ckpt.get('state_dict', ckpt)
    if not isinstance(sd, Mapping):
        raise ValueError(f"the checkpoint's 'state_dict' is a {type(sd).__name__}, not a dict")
    return sd


def analyse_state_dict(state_dict: Mapping[str, torch.Tensor],
                       baseline: Optional[Mapping[str, torch.Tensor]] = None,
                       layers: Optional[str] = None, max_kernels: int = 512) -> List[Dict]:
    """Analyse every RefConv layer of a state dict, in state-dict (depth) order.

    Args:
        state_dict: A refocused state dict (``<p>weight`` and ``<p>refocus_weight``).
        baseline: Optional plain state dict of the original model; if given, ``W_b``
            is taken from it and each layer records whether the checkpoint's own
            basis equals it (``basis_equals_baseline``, ``basis_max_abs_diff``).
        layers: Optional regex; only layers whose name it matches (``re.search``) are kept.
        max_kernels: Output kernels used at most for the redundancy of one layer.

    Returns:
        One dict per layer (``name``, ``index``, ``kernel_shape``, ``groups``,
        ``rel_change``, ``redundancy_before/after``, ``skeleton_before/after``, ...).

    Raises:
        ValueError: no RefConv weights, no layer matching ``layers``, a missing
            basis, or a baseline that lacks or mis-shapes a layer's weight.
    """
    prefixes = refconv_prefixes(state_dict)
    if not prefixes:
        raise ValueError(f'no RefConv weights (no *.{REFOCUS_KEY} keys): this is a plain '
                         'checkpoint, nothing to analyse')
    if layers is not None:
        pattern = re.compile(layers)
        prefixes = [p for p in prefixes if pattern.search(layer_name(p))]
        if not prefixes:
            raise ValueError(f'no RefConv layer name matches --layers {layers!r}')
    results = []
    for index, p in enumerate(prefixes):
        key = p + 'weight'
        if key not in state_dict:
            raise ValueError(f'{p + REFOCUS_KEY!r} has no basis {key!r} beside it')
        basis = state_dict[key]
        extra = {}
        if baseline is not None:
            if key not in baseline:
                raise ValueError(f'the baseline checkpoint has no {key!r}')
            base = baseline[key]
            if tuple(base.shape) != tuple(basis.shape):
                raise ValueError(f'baseline {key!r} has shape {tuple(base.shape)}, the '
                                 f'checkpoint {tuple(basis.shape)}')
            diff = (basis.double() - base.double()).abs().max().item() if basis.numel() else 0.
            extra = dict(basis_equals_baseline=bool(diff == 0), basis_max_abs_diff=diff)
            basis = base
        stats = analyse_layer(basis, state_dict[p + REFOCUS_KEY], max_kernels)
        results.append(dict(name=layer_name(p), index=index, **stats, **extra))
    return results


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float('nan')


def summarise(results: Sequence[Dict]) -> Dict:
    """Means over layers (ignoring ``nan``) of the change and the redundancies, and the count."""
    summary = dict(
        num_layers=len(results),
        mean_rel_change=_nanmean([r['rel_change'] for r in results]),
        mean_redundancy_before=_nanmean([r['redundancy_before'] for r in results]),
        mean_redundancy_after=_nanmean([r['redundancy_after'] for r in results]),
    )
    if results and 'basis_equals_baseline' in results[0]:
        summary['basis_equal_layers'] = sum(r['basis_equals_baseline'] for r in results)
    return summary


def select_layers(n: int, k: int) -> List[int]:
    """At most ``k`` of ``range(n)``, evenly spread across depth (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


# -- figures -------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only; no display on servers
    import matplotlib.pyplot as plt
    return plt


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else '...' + name[-(width - 3):]


def _layer_axis(ax, results: Sequence[Dict], max_named: int = 40) -> None:
    # Names are unreadable beyond a few dozen ticks; fall back to the layer index.
    if len(results) <= max_named:
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([_short(r['name'], 40) for r in results], rotation=90, fontsize=7)
    else:
        ax.set_xlabel('RefConv layer index (depth order)')


def _width(n: int) -> float:
    return float(min(max(0.28 * n + 3, 6), 30))


def _nan(v: Optional[float]) -> float:
    return float('nan') if v is None else v


def plot_relative_change(results: Sequence[Dict], path: str) -> None:
    """Bar chart of ``||W - W_b|| / ||W_b||`` per layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(_width(len(results)), 4.5))
    ax.bar(range(len(results)), [_nan(r['rel_change']) for r in results], color='tab:blue')
    ax.set_ylabel(r'$\|W - W_b\|_F \,/\, \|W_b\|_F$')
    ax.set_title('Relative kernel change from refocusing')
    ax.grid(axis='y', alpha=0.3)
    _layer_axis(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_redundancy(results: Sequence[Dict], path: str) -> None:
    """Channel redundancy per layer, before (``W_b``) and after (``W``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(_width(len(results)), 4.5))
    x = range(len(results))
    ax.plot(x, [_nan(r['redundancy_before']) for r in results], 'o-', label='before (W_b)',
            color='tab:gray')
    ax.plot(x, [_nan(r['redundancy_after']) for r in results], 's-', label='after (W)',
            color='tab:red', markersize=4)
    ax.axhline(0, color='black', linewidth=0.5)
    ax.set_ylabel('mean pairwise cosine (signed, off-diagonal)')
    ax.set_title('Channel redundancy of the output kernels')
    ax.grid(alpha=0.3)
    ax.legend()
    _layer_axis(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_skeletons(results: Sequence[Dict], path: str, max_layers: int = 12,
                   pairs_per_row: int = 4) -> List[str]:
    """Before/after skeleton heatmaps of up to ``max_layers`` non-1x1 layers; returns their names.

    Each before/after pair shares one colour scale so the two are comparable.
    """
    plt = _pyplot()
    spatial = [r for r in results if r['kernel_shape'][2] * r['kernel_shape'][3] > 1]
    chosen = [spatial[i] for i in select_layers(len(spatial), max_layers)]
    if not chosen:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis('off')
        ax.text(0.5, 0.5, 'no RefConv layer with a kernel larger than 1x1', ha='center',
                va='center')
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return []
    cols = min(len(chosen), pairs_per_row)
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.6 * 2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for i, r in enumerate(chosen):
        before, after = np.asarray(r['skeleton_before']), np.asarray(r['skeleton_after'])
        vmax = max(before.max(), after.max()) or 1.0
        for j, (img, tag) in enumerate(((before, 'before'), (after, 'after'))):
            ax = axes[i // cols, 2 * (i % cols) + j]
            ax.imshow(img, cmap='viridis', vmin=0, vmax=vmax)
            ax.set_title(f"{_short(r['name'], 22)}\n{tag}", fontsize=7)
            if img.size <= 25:  # small kernels: print the values, they are the point
                for (y, x), v in np.ndenumerate(img):
                    ax.text(x, y, f'{v / vmax:.2f}', ha='center', va='center', fontsize=6,
                            color='white' if v < 0.6 * vmax else 'black')
    fig.suptitle('Kernel skeletons: mean |W| per position (values: fraction of the pair max)',
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [r['name'] for r in chosen]


# -- report --------------------------------------------------------------------
def _fmt(v: Optional[float], spec: str = '.4f') -> str:
    return 'nan' if v is None or not math.isfinite(v) else format(v, spec)


def format_table(results: Sequence[Dict]) -> str:
    """The per-layer table plus the summary line, as printed by the CLI."""
    head = ('layer', 'kernel (Cout,Cin/g,kh,kw)', 'groups', 'rel_change', 'redund_before',
            'redund_after')
    rows = [(r['name'], 'x'.join(map(str, r['kernel_shape'])), str(r['groups']),
             _fmt(r['rel_change'], '.3e'), _fmt(r['redundancy_before']),
             _fmt(r['redundancy_after'])) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: '  '.join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(['-' * w for w in widths])] + [line(row) for row in rows]
    s = summarise(results)
    out.append(f"summary: {s['num_layers']} RefConv layers, mean rel_change "
               f"{_fmt(s['mean_rel_change'], '.3e')}, mean redundancy before "
               f"{_fmt(s['mean_redundancy_before'])} -> after {_fmt(s['mean_redundancy_after'])}")
    return '\n'.join(out)


def _json_safe(obj):
    # JSON has no NaN/inf: write null instead.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# -- CLI -----------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='refocus_analysis.py',
        description='Analyse a refocused RefConv checkpoint: relative kernel change, kernel '
        'skeletons and channel redundancy (' + REDUNDANCY_DEF + ') before and after refocusing.')
    p.add_argument('checkpoint', help='the refocused checkpoint (mmengine dict with '
                   "'state_dict', or a bare state dict)")
    p.add_argument('--baseline', help='plain checkpoint of the original model: W_b is taken '
                   "from it, and whether the checkpoint's basis equals it is reported")
    p.add_argument('--out-dir', help='where to write the figures and refocus_analysis.json '
                   '(default: <checkpoint dir>/refocus_analysis)')
    p.add_argument('--layers', help='only analyse layers whose name matches this regex '
                   '(re.search)')
    p.add_argument('--max-layers', type=int, default=12,
                   help='layers in the skeleton figure, evenly chosen across depth among '
                   'those with kernels larger than 1x1 (default: 12); the other figures show '
                   'every layer')
    p.add_argument('--max-kernels', type=int, default=512,
                   help='output kernels used at most per layer for the redundancy, evenly '
                   'spaced over Cout (default: 512)')
    p.add_argument('--force', action='store_true', help='overwrite existing output files')
    args = p.parse_args(argv)
    if args.max_layers < 1:
        p.error('--max-layers must be >= 1')
    if args.max_kernels < 2:
        p.error('--max-kernels must be >= 2')
    return args


def main(argv=None) -> int:
    """Run the analysis; returns the exit status. Raises ValueError & co. for bad input."""
    args = parse_args(argv)
    for path, what in ((args.checkpoint, 'checkpoint'), (args.baseline, 'baseline')):
        if path is not None and not osp.isfile(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
    if args.layers is not None:
        re.compile(args.layers)  # a bad regex fails before any work
    out_dir = args.out_dir or osp.join(osp.dirname(osp.abspath(args.checkpoint)),
                                       'refocus_analysis')
    paths = {name: osp.join(out_dir, name) for name in OUT_FILES}
    existing = [p for p in paths.values() if osp.exists(p)]
    # Checked before the (possibly slow) analysis so nothing is half-overwritten.
    if existing and not args.force:
        raise FileExistsError(f'{existing[0]!r} exists ({len(existing)} of the output files '
                              'do); pass --force to overwrite or choose another --out-dir')
    state_dict = state_dict_of(load_checkpoint_file(args.checkpoint))
    baseline = state_dict_of(load_checkpoint_file(args.baseline)) if args.baseline else None
    results = analyse_state_dict(state_dict, baseline, args.layers, args.max_kernels)

    print(format_table(results))
    if baseline is not None:
        same = [r for r in results if r['basis_equals_baseline']]
        worst = max(r['basis_max_abs_diff'] for r in results)
        print(f'baseline: the checkpoint basis equals the baseline weight in {len(same)}/'
              f'{len(results)} layers (max |diff| {worst:.3e}); W_b taken from the baseline')
        differ = [r['name'] for r in results if not r['basis_equals_baseline']]
        if differ:
            print(f'baseline: WARNING: basis differs from the baseline in {differ[:5]}'
                  + (' ...' if len(differ) > 5 else ''), file=sys.stderr)

    os.makedirs(out_dir, exist_ok=True)
    plot_relative_change(results, paths['relative_change.png'])
    shown = plot_skeletons(results, paths['skeletons.png'], args.max_layers)
    plot_redundancy(results, paths['redundancy.png'])
    report = dict(checkpoint=osp.abspath(args.checkpoint),
                  baseline=osp.abspath(args.baseline) if args.baseline else None,
                  layer_filter=args.layers, redundancy_definition=REDUNDANCY_DEF,
                  max_kernels=args.max_kernels, skeleton_layers=shown,
                  summary=summarise(results), layers=results)
    with open(paths['refocus_analysis.json'], 'w') as f:
        json.dump(_json_safe(report), f, indent=1)
    print(f'wrote {", ".join(OUT_FILES)} to {out_dir}')
    return 0


def cli() -> int:
    """``main`` with a one-line error and exit status 2 for bad input."""
    try:
        return main()
    except (ValueError, FileExistsError, FileNotFoundError, re.error) as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(cli())
