"""Fixtures for the one-run audit estimator (common/src/privacy/audit.rs).

The reference is the code of Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One
(1) Training Run", Appendix D (`p_value_DP_audit`, `get_eps_audit`), with SciPy's binomial
distribution (pinned in requirements.txt). Run:
    python3 make_audit_fixtures.py > audit_fixtures.json
"""
import json
import math

import scipy.stats


def p_value_DP_audit(m, r, v, eps, delta):
    assert 0 <= v <= r <= m
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha = 0
    total = 0
    for i in range(1, v + 1):
        total = total + scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    p = beta + alpha * delta * 2 * m
    return min(p, 1)


def get_eps_audit(m, r, v, delta, p):
    eps_min = 0
    eps_max = 1
    if p_value_DP_audit(m, r, v, 0, delta) >= p:
        return 0.0
    while p_value_DP_audit(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(40):
        eps = (eps_min + eps_max) / 2
        if p_value_DP_audit(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


cases = []
for m in [100, 1000, 5000]:
    for frac in [0.02, 0.1, 0.5, 1.0]:
        r = max(1, int(m * frac))
        for acc in [0.5, 0.6, 0.75, 0.9, 1.0]:
            v = min(r, int(round(r * acc)))
            for delta in [0.0, 1e-5, 1e-3]:
                for eps in [0.0, 0.5, 2.0, 8.0]:
                    cases.append({"m": m, "r": r, "v": v, "epsilon": eps, "delta": delta,
                                  "p_value": p_value_DP_audit(m, r, v, eps, delta)})
bounds = []
for m in [100, 1000, 5000]:
    for frac in [0.02, 0.1, 0.5]:
        r = max(1, int(m * frac))
        for acc in [0.6, 0.75, 0.9, 1.0]:
            v = min(r, int(round(r * acc)))
            for delta in [0.0, 1e-5]:
                for p in [0.05, 0.01]:
                    bounds.append({"m": m, "r": r, "v": v, "delta": delta, "p": p,
                                   "epsilon_lower_bound": get_eps_audit(m, r, v, delta, p)})
print(json.dumps({"p_values": cases, "bounds": bounds}, indent=1))
