#!/usr/bin/env python3
"""Writes the reference figures of the privacy-audit report's distributed-mode guarantee
against colluding sites (coordinator/src/audit/tests/against_sites_fixtures.json),
independently of fedflow: the mechanism's noise from first principles here, epsilon from
Google's dp_accounting RdpAccountant.

The Rust test coordinator/src/audit/tests/reference.rs must reproduce these to 1e-6
relative. It reads the committed JSON and needs no Python. Regenerate with (the same pinned packages as
the accountant's own fixtures):

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python tests/python/make_audit_fixtures.py > coordinator/src/audit/tests/against_sites_fixtures.json

The mechanism (distributed mode of site-level DP-FedAvg; McMahan et al. 2018 with the
distributed noise of Kairouz, Liu, Steinke 2021, no secure aggregation): with clip C, noise
multiplier z and expected_sites E, each of the k contributing sites adds N(0, s^2) with
s = z*C/sqrt(E), and the coordinator adds N(0, S^2) with S^2 = max(0, (z*C)^2 - k*s^2).
t colluding sites know their own shares (never the protected site's: under the zero-out
relation it contributes in both neighbouring rounds), so the noise still protecting a site
has variance S^2 + (k - min(t, k - 1))*s^2; over the sensitivity C, capped at the
downstream charge z, that is the round's Gaussian noise multiplier. No amplification: every
round is charged as a plain Gaussian mechanism (q = 1).
"""

import json
import math

from absl import logging
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

# What the report states besides the target delta (fedflow_common::privacy::REPORT_DELTAS).
REPORT_DELTAS = [1e-3, 1e-5, 1e-7, 1e-9]
# The coalition sizes the report lists (fedflow_coordinator::audit::COLLUDING_SITES), those
# below the run's largest contribution count, then "every other contributor" (None).
COLLUDING_SITES = [1, 2, 5, 10]

# (name, z, C, E, target delta, contributions per released round)
SCENARIOS = [
    # Exactly E contributions every round: the multiplier is z*sqrt(1 - t/E).
    ("every_round_expected", 1.0, 0.5, 10.0, 1e-5, [10, 10, 10]),
    # Dropouts, more than expected, nobody, one site alone.
    ("dropouts_and_surplus", 0.8, 1.0, 20.0, 1e-3, [12, 20, 27, 0, 1]),
    # Many sites, many rounds (composition over 150 rounds).
    ("many_sites", 1.2, 0.1, 100.0, 1e-5, [95, 101, 110] * 50),
    # A small federation.
    ("small_federation", 2.0, 2.0, 4.0, 1e-5, [2, 3, 4, 5]),
]


def round_multiplier(z, clip, expected, k, colluding):
    share = z * clip / math.sqrt(expected)
    top_up = max(0.0, (z * clip) ** 2 - k * share**2)
    others = max(k - 1, 0)
    known = others if colluding is None else min(colluding, others)
    unknown = top_up + (k - known) * share**2
    return min(math.sqrt(unknown) / clip, z)


def main():
    logging.set_verbosity(logging.ERROR)
    out = []
    for name, z, clip, expected, delta, ks in SCENARIOS:
        deltas = [delta] + [d for d in REPORT_DELTAS if d != delta]
        sizes = [t for t in COLLUDING_SITES if t < max(ks)] + [None]
        coalitions = []
        for t in sizes:
            zs = [round_multiplier(z, clip, expected, k, t) for k in ks]
            acc = rdp.RdpAccountant()  # default orders, add-or-remove-one neighbours
            for zr in zs:
                acc.compose(dp_event.GaussianDpEvent(zr))
            coalitions.append(
                {
                    "colluding_sites": t,
                    "round_multipliers": zs,
                    "epsilons": [acc.get_epsilon(d) for d in deltas],
                }
            )
        downstream = rdp.RdpAccountant()
        downstream.compose(dp_event.GaussianDpEvent(z), len(ks))
        out.append(
            {
                "name": name,
                "noise_multiplier": z,
                "clip_norm": clip,
                "expected_sites": expected,
                "target_delta": delta,
                "contributions": ks,
                "deltas": deltas,
                "downstream_epsilons": [downstream.get_epsilon(d) for d in deltas],
                "coalitions": coalitions,
            }
        )
    print(json.dumps({"generator": "tests/python/make_audit_fixtures.py", "scenarios": out}, indent=1))


if __name__ == "__main__":
    main()
