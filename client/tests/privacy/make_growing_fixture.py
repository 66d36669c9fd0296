#!/usr/bin/env python3
"""Writes growing_fixture.json: the record-level epsilon of a site whose data grew between
rounds, as Google's dp_accounting composes it (the reference for
client/src/site/growing_tests.rs).

Each round r is DP-SGD on the n_r units the site held when the round started: Poisson
sampling at q_r = B / n_r for steps_r steps of the Gaussian mechanism with multiplier z.
Charging every unit for every round composes all rounds (a unit that arrived late is
charged for rounds it was not in: a valid upper bound). Regenerate with:

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python client/tests/privacy/make_growing_fixture.py > client/tests/privacy/growing_fixture.json
"""

import json

from absl import logging
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

B = 16
Z = 1.1
DELTA = 1e-5
# (units, steps) of the test's three rounds: 200, 400 and 600 sessions in the file, 80%
# of them in the training split, two epochs each.
ROUNDS = [(162, 22), (317, 40), (484, 62)]


def main():
    # Fractional orders whose series does not converge are excluded (fedflow does the same).
    logging.set_verbosity(logging.ERROR)
    acc = rdp.RdpAccountant()  # default orders, add-or-remove-one neighbours
    for n, steps in ROUNDS:
        event = dp_event.PoissonSampledDpEvent(B / n, dp_event.GaussianDpEvent(Z))
        acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    doc = {
        "expected_batch_size": B,
        "noise_multiplier": Z,
        "delta": DELTA,
        "rounds": [{"units": n, "steps": s, "q": B / n} for n, s in ROUNDS],
        "epsilon": acc.get_epsilon(DELTA),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
