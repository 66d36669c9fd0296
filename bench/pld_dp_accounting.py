#!/usr/bin/env python3
"""The PLD benchmark's compositions (common/benches/pld.rs) with Google's dp_accounting
PLDAccountant, timed the same way (best of 5), for a side-by-side figure. Run with the
venv of common/tests/privacy/requirements.txt:

    /tmp/dp/bin/python bench/pld_dp_accounting.py
"""

import time

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant as pld


def event(q, z, steps):
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)


def timed(what, events):
    best, eps = float("inf"), None
    for _ in range(5):
        t = time.perf_counter()
        acc = pld.PLDAccountant()
        for e in events:
            acc.compose(e)
        eps = acc.get_epsilon(1e-5)
        best = min(best, time.perf_counter() - t)
    print(f"{what}: {best:.3f} s (best of 5), epsilon {eps:.4f} at delta 1e-5")


for q, z in [(0.01, 1.0), (0.001, 0.7), (0.25, 3.0)]:
    timed(f"20,000 steps, q {q}, z {z}", [event(q, z, 20000)])
timed("50 rounds of 100 steps, q 0.01 to 0.03, z 1.1",
      [event(0.01 + 0.0004 * r, 1.1, 100) for r in range(50)])
