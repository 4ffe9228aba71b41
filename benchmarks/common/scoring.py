"""Fidelity of a continuation scored twice by the server: with the full context and with a reduced one.

Why from prompt logprobs: vLLM returns, for every prompt position, the logprob of the actual token and
its top-k distribution, after whatever the context was (full, compacted, summarised) — so the
continuation is teacher-forced through the real serving path, and nothing has to be re-implemented.
KL is computed over the full context's top ``k`` tokens (KL@k); a token missing from the reduced
context's top ``k`` gets that context's k-th logprob, so KL@k is a lower bound of the true KL.
"""

from __future__ import annotations

import math

Rows = list  # per position: {token id: logprob} or None for the first prompt token


def score(full: Rows, reduced: Rows, cont: list[int], full_start: int, reduced_start: int, top: int = 20) -> dict:
    """ΔNLL (% of full NLL), teacher-forced top-1 agreement and KL@top over the continuation ``cont``,
    which starts at prompt position ``full_start`` in the full request and ``reduced_start`` in the other."""
    nll_full = nll_reduced = kl = agree = 0.0
    for i, token in enumerate(cont):
        f, r = full[full_start + i], reduced[reduced_start + i]
        nll_full -= f[token]
        nll_reduced -= r[token]
        agree += max(f, key=f.get) == max(r, key=r.get)
        floor = sorted(r.values(), reverse=True)[: top][-1]
        for t in sorted(f, key=f.get, reverse=True)[:top]:
            kl += math.exp(f[t]) * (f[t] - r.get(t, floor))
    n = len(cont)
    return {
        "delta_nll_pct": 100.0 * (nll_reduced - nll_full) / nll_full,
        "nll_full": nll_full / n,
        "nll": nll_reduced / n,
        "top1_agreement": agree / n,
        "kl": kl / n,
    }
