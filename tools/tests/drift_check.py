"""Drift statistics computed independently of Quiver, with numpy and scipy.

Reads one JSON object on stdin:
  {"features": [{"feature": str, "kind": "numeric" | "categorical",
                 "baseline": [values or null], "current": [values or null],
                 "edges": [float]   # numeric: the stored baseline's bin edges
                }]}
and prints {"feature": {"psi": float|null, "js": float|null, "ks": float|null,
                        "edges_ok": bool}} with the definitions of README "Drift":
buckets are the bins (or the baseline's 20 most frequent categories and "other") and a null
bucket; shares are count/rows; PSI floors shares at 1e-4; JS is base 2; KS is
scipy.stats.ks_2samp's statistic over the non-null values.
"""

import json
import sys
from collections import Counter

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

FLOOR = 1e-4
CATEGORIES = 20
BINS = 10


def numeric_shares(values, edges):
    rows = len(values)
    if rows == 0:
        return None
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    # Bin i holds edges[i-1] <= x < edges[i]: the count of edges at or below x.
    idx = np.searchsorted(np.array(edges, dtype=np.float64), present, side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    nulls = rows - len(present)
    return np.append(counts / rows, nulls / rows)


def categorical_shares(values, categories):
    rows = len(values)
    if rows == 0:
        return None
    counts = Counter(v for v in values if v is not None)
    known = [counts.get(c, 0) for c in categories]
    other = sum(n for c, n in counts.items() if c not in categories)
    nulls = sum(1 for v in values if v is None)
    return np.array(known + [other, nulls], dtype=np.float64) / rows


def deciles(values):
    xs = sorted(v for v in values if v is not None)
    n = len(xs)
    out = []
    for q in range(1, BINS):
        e = xs[min(q * n // BINS, n - 1)] if n else None
        if e is not None and (not out or out[-1] != e):
            out.append(e)
    return out


def psi(b, c):
    b, c = np.maximum(b, FLOOR), np.maximum(c, FLOOR)
    return float(np.sum((c - b) * np.log(c / b)))


def main():
    request = json.load(sys.stdin)
    out = {}
    for f in request["features"]:
        base, cur = f["baseline"], f["current"]
        edges_ok = True
        if f["kind"] == "numeric":
            edges = f["edges"]
            edges_ok = deciles(base) == edges
            b, c = numeric_shares(base, edges), numeric_shares(cur, edges)
            bv = [v for v in base if v is not None]
            cv = [v for v in cur if v is not None]
            ks = float(ks_2samp(bv, cv).statistic) if bv and cv else None
        else:
            counts = Counter(v for v in base if v is not None)
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CATEGORIES]
            categories = [k for k, _ in top]
            edges_ok = categories == f["categories"]
            b, c = categorical_shares(base, categories), categorical_shares(cur, categories)
            ks = None
        if b is None or c is None:
            out[f["feature"]] = {"psi": None, "js": None, "ks": ks, "edges_ok": edges_ok}
            continue
        js = float(jensenshannon(b, c, base=2) ** 2)
        out[f["feature"]] = {"psi": psi(b, c), "js": js, "ks": ks, "edges_ok": edges_ok}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
