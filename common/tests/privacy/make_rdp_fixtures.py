#!/usr/bin/env python3
"""Writes rdp_fixtures.json: reference values from Google's dp_accounting RdpAccountant.

fedflow's accountant (common/src/privacy/rdp.rs) must reproduce these to 1e-6 relative
(common/tests/rdp_reference.rs). Regenerate with:

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python common/tests/privacy/make_rdp_fixtures.py > common/tests/privacy/rdp_fixtures.json

The grid covers the sampling rates, noise multipliers, step counts and deltas of DP-SGD
at partner sites and DP-FedAvg across sites, plus the edge cases (q = 0, q = 1, z = 0,
steps = 0, delta = 0, tiny z where high orders blow up), and composed runs whose rounds
have different parameters.
"""

import json
import math
import sys

from absl import logging
import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp


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


def accountant(rounds):
    acc = rdp.RdpAccountant()  # default orders, add-or-remove-one neighbours
    for q, z, steps in rounds:
        acc.compose(event(q, z, steps))
    return acc


QS = [0.0, 1e-5, 1e-3, 0.004, 0.01, 0.032, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0]
ZS = [0.0, 0.1, 0.35, 0.5, 0.7, 1.0, 1.3, 2.0, 4.0, 10.0]
STEPS = [1, 25, 600, 20000]
DELTAS = [1e-3, 1e-5, 1e-8]
EPSILONS = [0.5, 3.0]


def main():
    # dp_accounting warns (and returns inf) for fractional orders whose series does not
    # converge in 1000 terms; fedflow reproduces that, so the warnings are expected here.
    logging.set_verbosity(logging.ERROR)
    orders = list(rdp.DEFAULT_RDP_ORDERS)
    single = []
    for q in QS:
        for z in ZS:
            acc1 = accountant([(q, z, 1)])
            rdp_one = [num(r) for r in acc1.rdp]
            for steps in STEPS:
                acc = accountant([(q, z, steps)])
                eps = []
                for delta in DELTAS:
                    e, o = acc.get_epsilon_and_optimal_order(delta)
                    eps.append({"delta": delta, "epsilon": num(e), "order": num(o)})
                dlt = []
                for target in EPSILONS:
                    d, o = acc.get_delta_and_optimal_order(target)
                    dlt.append({"epsilon": target, "delta": num(d), "order": num(o)})
                single.append({
                    "q": q, "z": z, "steps": steps,
                    "epsilons": eps, "deltas": dlt,
                })
            single[-1]["rdp_one_step"] = rdp_one
    composed = []
    runs = [
        [(0.04, 1.1, 250), (0.05, 1.1, 200), (0.02, 0.9, 500)],
        [(0.01, 0.8, 1000), (1.0, 30.0, 1)],  # DP-SGD rounds plus a noisy count
        [(0.3, 1.0, 10)] * 20,
        [(0.004, 0.6, 2500), (0.0, 1.0, 99), (0.5, 5.0, 3)],
    ]
    for rounds in runs:
        acc = accountant(rounds)
        eps = []
        for delta in DELTAS + [0.0]:
            e, o = acc.get_epsilon_and_optimal_order(delta)
            eps.append({"delta": delta, "epsilon": num(e), "order": num(o)})
        composed.append({
            "rounds": [{"q": q, "z": z, "steps": s} for q, z, s in rounds],
            "epsilons": eps,
            "rdp": [num(r) for r in acc.rdp],
        })
    json.dump({
        "source": "dp_accounting " + getattr(dp_accounting, "__version__", "0.6.0")
                  + " rdp.RdpAccountant, ADD_OR_REMOVE_ONE, default orders",
        "generator": "common/tests/privacy/make_rdp_fixtures.py",
        "orders": orders,
        "single": single,
        "composed": composed,
    }, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
