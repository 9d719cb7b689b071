"""Reading what an mmengine run left in its work dir: checkpoints, metrics, loss curves.

Shared by ``tools/demo.py`` and the end-to-end tests, which
all drive ``tools/train.py`` / ``tools/test.py`` as subprocesses and read their results back.
"""
import glob
import json
import os.path as osp
from typing import Dict, List, Optional, Tuple

__all__ = ['last_checkpoint', 'logged_metrics', 'train_curve']


def last_checkpoint(work_dir: str) -> str:
    """The checkpoint mmengine's CheckpointHook recorded as the latest in ``work_dir``."""
    path = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: did training in {work_dir} save a '
                                'checkpoint?')
    with open(path) as f:
        return f.read().strip()


def _json_logs(work_dir: str) -> List[str]:
    # tools/test.py: <work_dir>/<stamp>/<stamp>.json; the validation inside tools/train.py:
    # <work_dir>/<stamp>/vis_data/<stamp>.json (scalars.json repeats it).
    files = (glob.glob(osp.join(work_dir, '*', '[0-9]*.json')) +
             glob.glob(osp.join(work_dir, '*', 'vis_data', '[0-9]*.json')))
    return sorted(files, key=osp.getmtime)


def logged_metrics(work_dir: str, key: Optional[str] = None) -> Dict[str, float]:
    """The numeric fields of the last record (holding ``key``, if given) logged under ``work_dir``.

    Args:
        work_dir: The ``--work-dir`` of a ``tools/test.py`` or ``tools/train.py`` run.
        key: A metric name such as ``'coco/bbox_mAP'`` or ``'mIoU'``; without it the last
            record of the newest log is returned (a test run's metrics).
    """
    files = _json_logs(work_dir)
    for path in reversed(files):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        for rec in reversed(records):
            if key is None or key in rec:
                return {k: v for k, v in rec.items() if isinstance(v, (int, float))}
    raise FileNotFoundError(f'no mmengine log JSON under {work_dir}' +
                            (f' holds {key!r}' if key else ''))


def train_curve(work_dir: str) -> Tuple[List[int], List[float]]:
    """``(iterations, losses)`` of the training runs in ``work_dir`` (mmengine's scalars.json)."""
    its: List[int] = []
    losses: List[float] = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if 'loss' in rec and 'iter' in rec:
                    its.append(rec['iter'])
                    losses.append(rec['loss'])
    return its, losses
