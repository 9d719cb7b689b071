"""The main job (tools/demo.py) end to end at a tiny budget: four arms, one table; and the
interleaved timing protocol its inference row uses (refconv_mm.experiments.timing)."""
import json

import pytest

from refconv_mm.experiments.timing import interleaved_times, medians, paired_ratios, rotated

from .conftest import run_tool


def test_demo_has_the_equal_budget_control(tmp_path):
    work = tmp_path / 'demo'
    proc = run_tool('tools/demo.py', '--iters', '6', '--refocus-iters', '4', '--work-dir',
                    str(work), timeout=1200)
    summary = json.load(open(work / 'summary.json'))
    names = ['baseline', 'continued', 'refocused', 'merged']
    assert list(summary['metrics']) == names
    # the control is the ORIGINAL config (no RefConv) with the refocus stage's budget
    cont_cfg = (work / 'continued_config.py').read_text()
    assert 'RefConv' not in cont_cfg and 'max_iters=4' in cont_cfg.replace(' ', '')
    log = (work / 'continued.log').read_text()
    assert 'Iter(train) [4/4]' in log and 'RefConvHook' not in log
    lines = (work / 'summary.md').read_text().splitlines()
    table = [line for line in lines if line.startswith('|')]
    assert table == lines[:len(table)]  # the table, then the note on how inference was timed
    assert table[0].startswith('| | baseline (ORIGINAL config) | continued (ORIGINAL config, +4 it)'
                               ' | refocused (RefConv, +4 it) | merged (ORIGINAL config) |')
    assert all(row.count('|') == 6 for row in table)
    assert summary['times']['continued'] > 0
    assert (work / 'training_curves.png').stat().st_size > 10_000
    assert 'equal-budget control' in proc.stdout
    # refocused and merged agree exactly (the merge is exact)
    key = 'coco/bbox_mAP'
    assert summary['metrics']['merged'][key] == summary['metrics']['refocused'][key]

    # inference: all four models timed in the same interleaved rounds, the architecture said
    rows = {r.split('|')[1].strip(): [c.strip() for c in r.split('|')[2:-1]] for r in table[2:]}
    assert rows['architecture at inference'] == [
        'plain', 'plain', 'plain + refocusing transform per conv (unmerged)', 'plain']
    timed = rows['inference, 1x128x128 (ms, median of 24 interleaved rounds)']
    assert [float(c) for c in timed] == [round(summary['inference_ms'][n], 1) for n in names]
    ratios = rows['time / baseline (median of per-round ratios)']
    assert ratios[0] == 'reference' and all(c.endswith('x') for c in ratios[1:])
    assert summary['inference_ratio_to_baseline']['baseline'] == 1.0
    assert all(len(summary['inference_rounds_ms'][n]) == 24 for n in names)
    assert summary['inference_protocol']['rounds'] == 24
    assert summary['architecture']['merged'] == summary['architecture']['baseline'] == 'plain'
    note = lines[len(table):]
    assert any('rotated every round' in n and 'baseline, continued, merged run the same plain '
               'architecture: their medians' in n and 'ratio row' in n for n in note)
    assert 'rotated every round' in proc.stdout
    # quiet: no Python warning from the stack (pkg_resources' UserWarning), no ERROR line
    assert 'Warning:' not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert 'ERROR' not in proc.stdout + proc.stderr


def test_rotated_order():
    assert [rotated('ABC', i) for i in range(4)] == [
        ['A', 'B', 'C'], ['B', 'C', 'A'], ['C', 'A', 'B'], ['A', 'B', 'C']]


class FakeClock:
    """A clock that each fake call advances by its own cost: the timed seconds are known."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_times_rotates_and_pairs_rounds():
    clock, order = FakeClock(), []
    # round r costs (r + 1) times more for everyone (machine noise); B is always 2x A, C 3x A
    cost = dict(A=1.0, B=2.0, C=3.0)

    def call(name):
        def run():
            rnd = len(order) // 3  # warm-up rounds included
            order.append(name)
            clock.now += cost[name] * (rnd + 1)
        return run

    times = interleaved_times({n: call(n) for n in 'ABC'}, rounds=6, warmup=1, clock=clock)
    rounds = [''.join(order[i:i + 3]) for i in range(0, len(order), 3)]
    # every round calls each variant once, the order rotated every round (warm-up included)
    assert rounds == ['ABC', 'BCA', 'CAB', 'ABC', 'BCA', 'CAB', 'ABC']
    # warm-up dropped; index r of every list is timed round r
    assert times == {n: [c * (r + 2) for r in range(6)] for n, c in cost.items()}
    # the noise (growing every round) cancels in the paired ratios, not in the medians' ratio
    assert paired_ratios(times, 'A') == dict(A=1.0, B=2.0, C=3.0)
    assert medians(times) == dict(A=4.5, B=9.0, C=13.5)


def test_paired_ratios_pair_the_same_round():
    # B is 1.5x or 1.1x A in four rounds of five; three slow rounds of A put its median above B's
    times = dict(A=[1.0, 1.0, 10.0, 10.0, 10.0], B=[1.5, 1.5, 1.5, 11.0, 11.0])
    assert medians(times)['A'] > medians(times)['B']
    assert paired_ratios(times, 'A')['B'] == pytest.approx(1.1)
    with pytest.raises(ValueError, match='not paired'):
        paired_ratios(dict(A=[1.0, 2.0], B=[1.0]), 'A')
    with pytest.raises(ValueError):
        interleaved_times({}, rounds=3)
