#!/usr/bin/env python3
"""Writes pld_fixtures.json: reference values from Google's dp_accounting PLDAccountant.

fedflow's PLD accountant (common/src/privacy/pld.rs) must reproduce these to 1e-3 relative
and never fall below them by more than that (common/tests/pld_reference.rs). Regenerate with:

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python common/tests/privacy/make_pld_fixtures.py > common/tests/privacy/pld_fixtures.json

The accountant is the reference's default: add-or-remove-one neighbours, value
discretisation interval 1e-4, pessimistic connect-the-dots. The grid covers the sampling
rates, noise multipliers and step counts of DP-SGD at partner sites and of DP-FedAvg
across sites, three deltas and two epsilons for each, the edge cases (q = 0, q = 1,
z = 0), and runs whose rounds have different parameters.
"""

import json
import math
import sys

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant as pld


def num(x):
    """JSON has no inf/nan: encode them as strings."""
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return x


def event(q, z, steps):
    gaussian = dp_event.GaussianDpEvent(z)
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, gaussian), steps)


QS = [1e-3, 0.004, 0.01, 0.032, 0.1, 0.25, 1.0]
ZS = [0.6, 0.8, 1.0, 1.3, 2.0, 4.0]
STEPS = [1, 100, 2000]
DELTAS = [1e-3, 1e-5, 1e-8]
EPSILONS = [0.5, 3.0]

# Runs of rounds with different parameters (a site whose data grows, a run whose noise
# changes), and edge cases.
RUNS = [
    [(0.01, 1.1, 300), (0.008, 1.1, 300), (0.005, 1.1, 300)],
    [(0.05, 1.0, 50), (0.05, 2.0, 50)],
    [(0.004, 0.9, 1000), (0.02, 1.3, 200), (1.0, 8.0, 3)],
    [(0.1, 1.5, 20)] * 5,
    [(0.0, 1.0, 100), (0.02, 1.0, 100)],
    [(0.02, 0.0, 10)],
    [(0.001, 0.7, 20000)],
    [(0.01, 1.0, 20000)],
    [(0.25, 3.0, 20000)],
]


def main():
    settings = []
    runs = [[(q, z, s)] for q in QS for z in ZS for s in STEPS] + RUNS
    for rounds in runs:
        acc = pld.PLDAccountant()
        for q, z, steps in rounds:
            acc.compose(event(q, z, steps))
        settings.append({
            "rounds": [{"q": q, "z": z, "steps": s} for q, z, s in rounds],
            "epsilons": [{"delta": d, "epsilon": num(acc.get_epsilon(d))} for d in DELTAS],
            "deltas": [{"epsilon": e, "delta": num(acc.get_delta(e))} for e in EPSILONS],
        })
        print(len(settings), file=sys.stderr)
    json.dump({
        "reference": "dp-accounting " + dp_accounting.__version__ if hasattr(dp_accounting, "__version__") else "dp-accounting 0.6.0",
        "accountant": "PLDAccountant(ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)",
        "settings": settings,
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
