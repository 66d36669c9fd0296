#!/usr/bin/env python3
"""Writes replace_one_fixtures.json: replace-one (substitution) bounds of the
Poisson-subsampled Gaussian, and the per-unit bounds of site ledgers, computed from Google's
dp_accounting add/remove RDP values and its RDP -> (epsilon, delta) conversion.

dp_accounting 0.6.0 itself refuses PoissonSampledDpEvent under REPLACE_ONE (RdpAccountant
and PLDAccountant alike), so the replace-one curve is built here the way fedflow builds it
(common/src/privacy/neighbours.rs): the weak triangle inequality of Mironov 2017 ("Renyi
Differential Privacy", Proposition 11, p = q = 2) over a removal followed by an addition,

    RDP_replace(a) = (2a - 1) / (2a - 2) * RDP_add(2a) + RDP_add(2a - 1),

with RDP_add from dp_accounting's _compute_rdp_poisson_subsampled_gaussian and epsilon from
dp_accounting.rdp.compute_epsilon. fedflow's Rust must reproduce these to 1e-6 relative
(the unit tests of common/src/privacy/neighbours.rs and client/src/ledger.rs).

The ledger rule (client/src/ledger.rs), for a report about unit u and an entry of unit e:
  - e == u: add/remove charges RDP_add, replace-one charges RDP_replace;
  - u = session, e = user: removing one session changes one user's unit (a substitution of
    it), so add/remove charges RDP_replace, and replace-one (two such changes) charges the
    triangle inequality applied once more;
  - u = user, e = session: no bound (a user may have any number of sessions).

Regenerate with:

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python common/tests/privacy/make_replace_one_fixtures.py > common/tests/privacy/replace_one_fixtures.json
"""

import json
import math
import sys

from absl import logging
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp

MAX_ORDER = 1e6
DELTAS = [1e-3, 1e-5, 1e-8]


def num(x):
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def rdp_add(q, z):
    def f(orders):
        return list(rdp._compute_rdp_poisson_subsampled_gaussian(q, z, np.array(orders, dtype=float)))
    return f


def two_step(f):
    """The weak triangle inequality over two add/remove steps, order by order."""
    def g(orders):
        out = []
        for a in orders:
            if not (a > 1 and math.isfinite(a) and 2 * a <= MAX_ORDER):
                out.append(math.inf)
                continue
            hi, lo = f([2 * a, 2 * a - 1])
            out.append((2 * a - 1) / (2 * a - 2) * hi + lo)
        return out
    return g


def epsilon(orders, curve, delta):
    e, _ = rdp.compute_epsilon(orders, curve, delta)
    return e


def charge(report_unit, entry_unit, relation, q, z):
    """The per-step curve an entry of entry_unit costs a report about report_unit."""
    add = rdp_add(q, z)
    if entry_unit == report_unit:
        return add if relation == "add_remove" else two_step(add)
    if report_unit == "session" and entry_unit == "user":
        return two_step(add) if relation == "add_remove" else two_step(two_step(add))
    return None  # a user-level bound from session-level releases: none


def ledger_bounds(entries, orders, delta):
    out = {}
    for unit in ["session", "user"]:
        out[unit] = {}
        for relation in ["add_remove", "replace_one"]:
            total = np.zeros(len(orders))
            bounded = True
            for e_unit, q, z, steps in entries:
                f = charge(unit, e_unit, relation, q, z)
                if f is None:
                    bounded = False
                    break
                total += steps * np.array(f(orders))
            out[unit][relation] = num(epsilon(orders, total, delta)) if bounded else None
    return out


def main():
    logging.set_verbosity(logging.ERROR)
    orders = list(rdp.DEFAULT_RDP_ORDERS)
    single = []
    for q, z, steps in [
        (1e-3, 1.0, 1000), (0.01, 0.8, 500), (0.01, 1.1, 2000), (0.02, 0.6, 300),
        (0.05, 1.2, 20), (0.05, 1.0, 200), (0.1, 2.0, 50), (0.25, 1.5, 40),
        (0.5, 4.0, 10), (1.0, 10.0, 5), (1.0, 1.0, 1), (0.004, 0.7, 2500),
    ]:
        one = two_step(rdp_add(q, z))(orders)
        total = [steps * r for r in one]
        single.append({
            "q": q, "z": z, "steps": steps,
            "rdp_one_step": [num(r) for r in one],
            "epsilons": [{"delta": d, "epsilon": num(epsilon(orders, total, d))} for d in DELTAS],
        })
    ledgers = []
    for entries in [
        # user-level, session-level, user-level: a ledger mixing units
        [("user", 0.05, 1.2, 20), ("session", 0.04, 1.1, 25), ("user", 0.05, 1.2, 20)],
        # user-level only
        [("user", 0.05, 1.2, 20)] * 3,
        # session-level only
        [("session", 0.04, 1.1, 25), ("session", 0.02, 0.9, 50)],
    ]:
        ledgers.append({
            "entries": [{"unit": u, "q": q, "z": z, "steps": s} for u, q, z, s in entries],
            "delta": 1e-5,
            "bounds": ledger_bounds(entries, orders, 1e-5),
        })
    json.dump({
        "source": "dp_accounting 0.6.0 _compute_rdp_poisson_subsampled_gaussian and "
                  "compute_epsilon, default orders, through the weak triangle inequality "
                  "(Mironov 2017, Prop. 11, p = 2)",
        "generator": "common/tests/privacy/make_replace_one_fixtures.py",
        "orders": orders,
        "single": single,
        "ledgers": ledgers,
    }, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
