"""refconv_mm.experiments.runlogs on the files mmengine writes, and its errors on a run that wrote none."""
import json
import os

import pytest

from refconv_mm.experiments.runlogs import last_checkpoint, logged_metrics, train_curve


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in lines))


def test_reads_test_log_validation_log_and_curve(tmp_path):
    w = str(tmp_path)
    _write(f'{w}/20260101_000000/vis_data/20260101_000000.json',
           [{'loss': 1.5, 'iter': 1, 'lr': 0.1}, {'coco/bbox_mAP': 0.2, 'step': 2}])
    _write(f'{w}/20260101_000000/vis_data/scalars.json',
           [{'loss': 1.5, 'iter': 1}, {'loss': 1.0, 'iter': 2}, {'coco/bbox_mAP': 0.2}])
    with open(f'{w}/last_checkpoint', 'w') as f:
        f.write(f'{w}/iter_2.pth\n')
    assert logged_metrics(w, 'coco/bbox_mAP') == {'coco/bbox_mAP': 0.2, 'step': 2}
    assert train_curve(w) == ([1, 2], [1.5, 1.0])
    assert last_checkpoint(w) == f'{w}/iter_2.pth'
    # a later tools/test.py run in the same work dir is what logged_metrics() returns
    later = f'{w}/20260101_000100/20260101_000100.json'
    _write(later, [{'coco/bbox_mAP': 0.3, 'mode': 'x'}])
    os.utime(later, (2e9, 2e9))  # newest, whatever the filesystem's mtime resolution
    assert logged_metrics(w) == {'coco/bbox_mAP': 0.3}


def test_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='last_checkpoint does not exist'):
        last_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='no mmengine log JSON'):
        logged_metrics(str(tmp_path))
    _write(f'{tmp_path}/20260101_000000/20260101_000000.json', [{'mIoU': 50.0}])
    with pytest.raises(FileNotFoundError, match="holds 'coco/bbox_mAP'"):
        logged_metrics(str(tmp_path), 'coco/bbox_mAP')
