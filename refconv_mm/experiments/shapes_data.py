"""Small, deterministic "shapes" datasets for demos and tests (no download).

Detection: COCO-format json + images. Segmentation: mmseg's folder layout
(``img_dir/{train,val}``, ``ann_dir/{train,val}``, label 0 = background).
Classification: mmpretrain's ``CustomDataset`` layouts (one folder per class, and
annotation files ``meta/{train,val}.txt``), one shape per image.
Images are noisy textured backgrounds with filled rectangles, ellipses and
triangles of three classes; the same seed always writes the same files.
"""
import json
import os
import os.path as osp
from typing import Dict, Tuple

import numpy as np

__all__ = ['CLASSES', 'make_detection_set', 'make_segmentation_set', 'make_classification_set']

CLASSES = ('rectangle', 'ellipse', 'triangle')


def _shape_mask(size: int, cls: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Boolean mask of one filled shape of class ``cls`` in the box ``(x0, y0, w, h)``."""
    import cv2
    mask = np.zeros((size, size), np.uint8)
    if cls == 0:
        cv2.rectangle(mask, (x0, y0), (x0 + w - 1, y0 + h - 1), 1, -1)
    elif cls == 1:
        cv2.ellipse(mask, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    else:
        pts = np.array([[x0 + w // 2, y0], [x0, y0 + h - 1], [x0 + w - 1, y0 + h - 1]])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def _scene(rng: np.random.Generator, size: int, max_objects: int):
    """One image, its per-pixel class map (0 = background) and its objects."""
    import cv2
    img = rng.integers(40, 90, (size, size, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    label = np.zeros((size, size), np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2.5, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        m = _shape_mask(size, cls, x0, y0, w, h)
        img[m] = color
        label[m] = cls + 1
        for o in objects:  # later shapes occlude earlier ones
            o['mask'] &= ~m
        objects.append(dict(cls=cls, mask=m))
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img, label, [o for o in objects if o['mask'].sum() >= 16]


def _write_png(path: str, arr: np.ndarray) -> None:
    import cv2
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, arr):
        raise OSError(f'could not write {path}')


def make_detection_set(root: str, num_train: int = 48, num_val: int = 16, size: int = 128,
                       seed: int = 0, max_objects: int = 3) -> Dict[str, str]:
    """Write a COCO-format shapes detection set under ``root``.

    Returns the paths: ``{'data_root', 'train_ann', 'val_ann', 'train_img', 'val_img'}``
    (annotation files relative to ``data_root``, as mmdet configs expect).
    """
    rng = np.random.default_rng(seed)
    out = {'data_root': root}
    for split, n in (('train', num_train), ('val', num_val)):
        images, anns = [], []
        for i in range(n):
            img, _, objects = _scene(rng, size, max_objects)
            name = f'{split}_{i:04d}.png'
            _write_png(osp.join(root, split, name), img[:, :, ::-1])
            images.append(dict(id=i + 1, file_name=name, height=size, width=size))
            for o in objects:
                ys, xs = np.nonzero(o['mask'])
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=o['cls'] + 1,
                                 bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                                 area=int(o['mask'].sum()), iscrowd=0,
                                 segmentation=[[int(x0), int(y0), int(x1), int(y0), int(x1),
                                                int(y1), int(x0), int(y1)]]))
        coco = dict(images=images, annotations=anns,
                    categories=[dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)])
        ann = osp.join('annotations', f'{split}.json')
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        with open(osp.join(root, ann), 'w') as f:
            json.dump(coco, f)
        out[f'{split}_ann'] = ann
        out[f'{split}_img'] = split + '/'
    return out


def make_segmentation_set(root: str, num_train: int = 48, num_val: int = 16, size: int = 128,
                          seed: int = 0, max_objects: int = 3) -> Dict[str, str]:
    """Write a shapes segmentation set in mmseg's folder layout under ``root``.

    Labels: 0 background, 1..3 the shapes in :data:`CLASSES` order.
    """
    rng = np.random.default_rng(seed + 1000)
    for split, n in (('train', num_train), ('val', num_val)):
        for i in range(n):
            img, label, _ = _scene(rng, size, max_objects)
            _write_png(osp.join(root, 'img_dir', split, f'{i:04d}.png'), img[:, :, ::-1])
            _write_png(osp.join(root, 'ann_dir', split, f'{i:04d}.png'), label)
    return dict(data_root=root, img_dir='img_dir', ann_dir='ann_dir')


def seg_classes() -> Tuple[str, ...]:
    """Class names of the segmentation set (background first)."""
    return ('background', ) + CLASSES


def _single_shape(rng: np.random.Generator, size: int, cls: int) -> np.ndarray:
    """One image holding one large shape of class ``cls`` on a noisy background."""
    import cv2
    img = rng.integers(40, 90, (size, size, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    # Large enough (>= 40% of the side) that the shape survives a small network's downsampling.
    w, h = (int(v) for v in rng.integers(max(4, size * 2 // 5), max(5, size * 4 // 5), 2))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    img[_shape_mask(size, cls, x0, y0, w, h)] = tuple(int(c) for c in rng.integers(120, 256, 3))
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def make_classification_set(root: str, num_train: int = 48, num_val: int = 24, size: int = 64,
                            seed: int = 0) -> Dict[str, object]:
    """Write a shapes classification set (one shape per image) under ``root``.

    Layout (both of mmpretrain ``CustomDataset``'s layouts over the same files)::

        root/{train,val}/<class name>/<split>_<i>.png   # folder layout
        root/meta/{train,val}.txt                       # "<class name>/<file> <label>" lines

    Labels are indices into :data:`CLASSES`; classes take turns, so the splits are balanced.
    With the annotation files and ``metainfo=dict(classes=CLASSES)`` the labels are
    :data:`CLASSES`' order; the folder layout alone sorts the class names alphabetically.

    Returns:
        ``{'data_root', 'classes', 'train_ann', 'val_ann', 'train_prefix', 'val_prefix'}``
        (annotation files and prefixes relative to ``data_root``, as mmpretrain configs expect).
    """
    rng = np.random.default_rng(seed + 2000)
    out: Dict[str, object] = dict(data_root=root, classes=CLASSES)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, n in (('train', num_train), ('val', num_val)):
        lines = []
        for i in range(n):
            cls = i % len(CLASSES)
            rel = f'{CLASSES[cls]}/{split}_{i:04d}.png'
            _write_png(osp.join(root, split, rel), _single_shape(rng, size, cls)[:, :, ::-1])
            lines.append(f'{rel} {cls}\n')
        ann = osp.join('meta', f'{split}.txt')
        with open(osp.join(root, ann), 'w') as f:
            f.writelines(lines)
        out[f'{split}_ann'] = ann
        out[f'{split}_prefix'] = split
    return out
