"""The main job (tools/demo.py) end to end at a tiny budget: four arms, one table."""
import json

from .conftest import run_tool


def test_demo_has_the_equal_budget_control(tmp_path):
    work = tmp_path / 'demo'
    proc = run_tool('tools/demo.py', '--iters', '6', '--refocus-iters', '4', '--work-dir',
                    str(work), timeout=1200)
    summary = json.load(open(work / 'summary.json'))
    assert list(summary['metrics']) == ['baseline', 'continued', 'refocused', 'merged']
    # the control is the ORIGINAL config (no RefConv) with the refocus stage's budget
    cont_cfg = (work / 'continued_config.py').read_text()
    assert 'RefConv' not in cont_cfg and 'max_iters=4' in cont_cfg.replace(' ', '')
    log = (work / 'continued.log').read_text()
    assert 'Iter(train) [4/4]' in log and 'RefConvHook' not in log
    table = (work / 'summary.md').read_text().splitlines()
    assert table[0].startswith('| | baseline (ORIGINAL config) | continued (ORIGINAL config, +4 it)'
                               ' | refocused (RefConv, +4 it) | merged (ORIGINAL config) |')
    assert all(row.count('|') == 6 for row in table)
    assert summary['times']['continued'] > 0
    assert (work / 'training_curves.png').stat().st_size > 10_000
    assert 'equal-budget control' in proc.stdout
    # refocused and merged agree exactly (the merge is exact)
    key = 'coco/bbox_mAP'
    assert summary['metrics']['merged'][key] == summary['metrics']['refocused'][key]
