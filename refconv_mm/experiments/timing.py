"""Timing several variants of one job against each other on a noisy machine.

Timed one after another (all of A, then all of B), a burst of load from elsewhere lands on one
variant and reads as that variant's cost. Interleaved rounds spread it: every round times each
variant once, so a slow stretch slows the whole round, and the order rotates every round
(A, B, C; B, C, A; C, A, B; ...), so no variant always runs first (cold) or always after the
same neighbour. Report each variant's median, and its ratio to a reference as the median over
rounds of the two times of the same round (a paired comparison: what the round's noise adds to
both cancels).
"""
import statistics
import time
from typing import Callable, Dict, List, Mapping, Sequence


def rotated(names: Sequence[str], round_index: int) -> List[str]:
    """The order of round ``round_index``: ``names`` rotated left by that many places."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def interleaved_times(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds each call takes, timed in interleaved rounds with the order rotated every round.

    Args:
        calls: the variants, name -> a callable running one unit of work (e.g. one forward).
        rounds: timed rounds; every variant is called once per round. A multiple of
            ``len(calls)`` puts every variant at every position equally often.
        warmup: rounds run first (same protocol) and not recorded: lazy initialisation,
            allocator and cache warm-up.
        clock: seconds (``time.perf_counter``); a test passes a fake one.

    Returns:
        ``{name: [seconds in timed round 0, 1, ...]}``: index ``r`` of every list is the same
        round, which :func:`paired_ratios` relies on.
    """
    if not calls or rounds < 1 or warmup < 0:
        raise ValueError(f'need at least one call and one round (got {len(calls)} calls, '
                         f'{rounds} rounds, {warmup} warm-up rounds)')
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        for name in rotated(names, i):
            t0 = clock()
            calls[name]()
            dt = clock() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def medians(times: Mapping[str, Sequence[float]]) -> Dict[str, float]:
    """Each variant's median time (the unit of ``times``)."""
    return {n: statistics.median(ts) for n, ts in times.items()}


def paired_ratios(times: Mapping[str, Sequence[float]], reference: str) -> Dict[str, float]:
    """Each variant's time over ``reference``'s: the median over rounds of the per-round ratio."""
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        if len(ts) != len(ref):
            raise ValueError(f'{name} has {len(ts)} rounds, {reference} {len(ref)}: not paired')
        out[name] = statistics.median(t / r for t, r in zip(ts, ref))
    return out
