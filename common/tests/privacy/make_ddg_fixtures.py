#!/usr/bin/env python3
"""Writes ddg_fixtures.json: the privacy of the distributed discrete Gaussian's sum
(Kairouz, Liu, Steinke, ICML 2021, arXiv:2102.06387, "KLS21"), computed here from the
paper's statements, independently of fedflow's Rust, with the RDP -> (epsilon, delta)
conversion of Google's dp_accounting 0.6.0 (rdp_privacy_accountant.compute_epsilon).

  - tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))            (KLS21 Theorem 1)
  - RDP(a) = min(a/2 D2^2 + tau d, a/2 (D2^2 + 2 D1 tau + tau^2 d),
                 a/2 (D2 + sqrt(d) tau)^2), D_i = sensitivity_i / (sqrt(n) sigma)
                                                                         (KLS21 Prop. 14)
  - Poisson sampling at rate q < 1: Zhu & Wang (ICML 2019) Theorem 5, integer orders,
    min with the unsampled curve.
  - rounding: sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)), capped by c + sqrt(d)
                                                                         (KLS21 4.1)

Here the binomial sums go through scipy.special.logsumexp with weights and exact integer
binomials (math.comb) rather than log-gamma, so the two computations share no code path.
The Rust test common/tests/ddg_reference.rs must reproduce every figure to 1e-6 relative.
Regenerate with:

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install -r common/tests/privacy/requirements.txt
    /tmp/dp/bin/python common/tests/privacy/make_ddg_fixtures.py > common/tests/privacy/ddg_fixtures.json
"""

import json
import math

import numpy as np
from absl import logging
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import special

DEFAULT_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)
DELTAS = [1e-5, 1e-9]


def tau(sigma, n):
    return 10.0 * sum(
        math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0)) for k in range(1, n)
    )


def prop14(alpha, l1, l2, sigma, n, d):
    t = tau(sigma, n)
    s1 = l1 / (math.sqrt(n) * sigma)
    s2 = l2 / (math.sqrt(n) * sigma)
    return min(
        alpha / 2.0 * s2**2 + t * d,
        alpha / 2.0 * (s2**2 + 2.0 * s1 * t + t**2 * d),
        alpha / 2.0 * (s2 + math.sqrt(d) * t) ** 2,
    )


def zhu_wang(alpha, q, eps):
    alpha = int(alpha)
    logs = [math.log(1 - q) * (alpha - 1), math.log(math.comb(alpha, 2)) + 2 * math.log(q)
            + (alpha - 2) * math.log(1 - q) + eps(2)]
    weights = [alpha * q - q + 1, 1.0]
    for l in range(3, alpha + 1):
        logs.append(math.log(math.comb(alpha, l)) + l * math.log(q)
                    + (alpha - l) * math.log(1 - q) + (l - 1) * eps(l))
        weights.append(3.0)
    return special.logsumexp(logs, b=weights) / (alpha - 1)


def curve(l1, l2, sigma, n, d, q):
    orders = DEFAULT_ORDERS if q == 1 else [a for a in DEFAULT_ORDERS if float(a).is_integer()]
    out = []
    for a in orders:
        plain = prop14(a, l1, l2, sigma, n, d)
        if q < 1:
            plain = min(plain, zhu_wang(a, q, lambda l: prop14(l, l1, l2, sigma, n, d)))
        out.append(plain)
    return orders, out


def rounded(c, beta, d):
    plain = c + math.sqrt(d)
    if beta == 0:
        return plain
    return min(plain, math.sqrt(c * c + d / 4.0 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2.0)))


# (L2 clip on the grid, beta, sigma per share, sites, dimension, q, rounds)
SCENARIOS = [
    (1000.0, math.exp(-0.5), 1500.0, 20, 10_000, 1.0, 100),
    (1000.0, 0.0, 300.0, 20, 10_000, 1.0, 100),
    (50.0, math.exp(-0.5), 2.0, 100, 73_000, 1.0, 50),
    (4000.0, math.exp(-0.5), 900.0, 10, 73_000, 0.1, 1000),
    (200.0, 0.0, 0.6, 50, 500, 0.5, 20),
    (10_000.0, math.exp(-0.5), 2500.0, 1000, 1_000_000, 0.01, 5000),
    (30.0, 0.0, 40.0, 3, 16, 1.0, 1),
]


def main():
    logging.set_verbosity(logging.ERROR)
    cases = []
    for c, beta, sigma, n, d, q, rounds in SCENARIOS:
        l2 = rounded(c, beta, d)
        l1 = l2 * min(math.sqrt(d), l2)
        orders, rdp_curve = curve(l1, l2, sigma, n, d, q)
        eps = {}
        for delta in DELTAS:
            e, order = rdp.compute_epsilon(orders, [r * rounds for r in rdp_curve], delta)
            eps[str(delta)] = [float(e), float(order)]
        cases.append({
            "clip": c, "beta": beta, "sigma": sigma, "sites": n, "dimension": d,
            "sampling_rate": q, "rounds": rounds, "tau": tau(sigma, n),
            "l2_sensitivity": l2, "l1_sensitivity": l1,
            "orders": [float(a) for a in orders], "rdp": [float(r) for r in rdp_curve],
            "epsilon": eps,
        })
    json.dump({
        "generator": "common/tests/privacy/make_ddg_fixtures.py",
        "reference": "KLS21 Theorem 1 and Proposition 14, Zhu & Wang 2019 Theorem 5, "
                     "dp_accounting 0.6.0 compute_epsilon",
        "cases": cases,
    }, indent=1, fp=__import__("sys").stdout)
    print()


if __name__ == "__main__":
    main()
