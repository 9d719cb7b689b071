"""The supported range, checked at ``import refconv_mm``; packaging declares ranges, not pins."""
import subprocess
import sys

import mmcv
import mmengine
import pytest
import torch

from refconv_mm import compat
from refconv_mm.compat import SUPPORTED, check_environment, parse_version

from .conftest import ROOT


@pytest.mark.parametrize('text, want', [('2.0.1+cu117', (2, 0, 1)), ('2.13.0', (2, 13, 0)),
                                        ('2.14.0a0+git1234', (2, 14, 0)), ('0.10', (0, 10, 0)),
                                        ('1.13.1', (1, 13, 1))])
def test_parse_version(text, want):
    assert parse_version(text) == want


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match='cannot read a version'):
        parse_version('unknown')


def test_this_environment_is_in_range():
    check_environment()
    for mod in (torch, mmcv, mmengine):
        low, high, _ = SUPPORTED[mod.__name__]
        assert low <= parse_version(mod.__version__) < high


@pytest.mark.parametrize('name, version', [('torch', '1.13.1'), ('torch', '2.14.0'),
                                           ('mmcv', '2.2.0'), ('mmcv', '1.7.2'),
                                           ('mmengine', '1.0.0')])
def test_out_of_range_is_one_sentence_naming_range_and_fix(name, version):
    # a real interpreter: the installed package reports another version before the import
    code = (f'import {name}; {name}.__version__ = {version!r}; import refconv_mm')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: refconv_mm supports ' + SUPPORTED[name][2]), last
    assert f'found {name} {version}' in last and last.count('. ') == 0 and last.endswith('.')
    assert ('mim install' in last) if name != 'mmengine' else ('pip install' in last)


def test_check_environment_names_a_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmengine', None)  # what an absent package imports as
    with pytest.raises(ImportError, match=r'needs mmengine>=0\.10\.0,<1\.0\.0 but cannot import'):
        compat.check_environment()
