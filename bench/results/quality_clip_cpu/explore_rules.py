"""Exploration (issue 19, not a shipped tool): range rules for 2-bit groups of HACK (its torch
reference encoder's quantizer patched) and KIVI (quantize_groups patched), perplexity with
bench/quality_breakdown.py's forward. Rules: minmax; sym7 = per-group MSE search over [min, max]
shrunk by 0, 5, .., 30% about its middle; asym = MSE search over each end cut by 0..20% (25
candidates); asymls = asym + 2 least-squares refits of (scale, min); fix10 = fixed cut of 10% of
the width a side (the shipped rule); aciq171 / aciq2 = [max(min, mu - a sd), min(max, mu + a sd)].
Codecs: hack2, hack2mix, kivi2, kivi2mix (kivi2 with layer 5 in kivi4).

    OMP_NUM_THREADS=1 PYTHONPATH=<parent of zipserve> python explore_rules.py stdlib 41 \
        minmax,sym7,asym,asymls hack2,hack2mix,kivi2,kivi2mix
    (text: stdlib | matplotlib | train; logs explore_<text>_<rules>.log; the logs' runs patched the encoder of
    commit 1235df2 / fb89fc0, before the shipped clip, with the same arithmetic)
"""

import math
import sys
import time

import torch

from zipserve.bench import quality_breakdown as qb
from zipserve.bench.quality_variants import Variant
from zipserve.compress import quantize as qz
from zipserve.kernels import hack_encode as he
from zipserve.train.corpus import load_corpus

torch.set_num_threads(1)
RULE = {"name": "minmax"}
STATS = {}


def _q(x, lo, hi, qmax):
    sc = ((hi - lo) / qmax).half().float()
    mn = lo.half().float()
    ok = sc > 0
    y = torch.where(ok, (x - mn) / torch.where(ok, sc, torch.ones_like(sc)), torch.zeros_like(x))
    return torch.floor(y + 0.5).clamp(0, qmax), sc, mn


def _q_sm(x, sc, mn, qmax):
    ok = sc > 0
    y = torch.where(ok, (x - mn) / torch.where(ok, sc, torch.ones_like(sc)), torch.zeros_like(x))
    return torch.floor(y + 0.5).clamp(0, qmax)


def search(x, lo, hi, qmax, dim, tag):
    rule = RULE["name"]
    q, sc, mn = _q(x, lo, hi, qmax)
    err = ((q * sc + mn - x) ** 2).sum(dim, keepdim=True)
    e0 = err.sum().item()
    kinds = RULE.get("kinds", "KV")
    is_k = tag.endswith("K")
    if rule in ("fix", "aciq") and qmax <= RULE.get("maxq", 3):
        if rule == "fix":
            r = hi - lo
            lo2, hi2 = lo + RULE["t"] * r, hi - RULE["t"] * r
        else:
            mu = x.mean(dim, keepdim=True)
            sd = x.std(dim, keepdim=True, unbiased=False)
            lo2 = torch.maximum(lo, mu - RULE["a"] * sd)
            hi2 = torch.minimum(hi, mu + RULE["a"] * sd)
        q, sc, mn = _q(x, lo2, hi2, qmax)
        err = ((q * sc + mn - x) ** 2).sum(dim, keepdim=True)
    elif (
        rule != "minmax"
        and qmax <= RULE.get("maxq", 3)
        and (("K" in kinds) if is_k else ("V" in kinds))
    ):
        if rule.startswith("sym"):
            grid = [(t, t) for t in RULE["ts"]]
        elif rule.startswith("asym"):
            grid = [(a, b) for a in RULE["ts"] for b in RULE["ts"]]
        r = hi - lo
        for a, b in grid:
            if a == 0 and b == 0:
                continue
            q2, sc2, mn2 = _q(x, lo + a * r, hi - b * r, qmax)
            e2 = ((q2 * sc2 + mn2 - x) ** 2).sum(dim, keepdim=True)
            better = e2 < err
            q = torch.where(better, q2, q)
            sc = torch.where(better, sc2, sc)
            mn = torch.where(better, mn2, mn)
            err = torch.where(better, e2, err)
        for _ in range(RULE.get("ls", 0)):
            qm = q.mean(dim, keepdim=True)
            xm = x.mean(dim, keepdim=True)
            var = ((q - qm) ** 2).sum(dim, keepdim=True)
            cov = ((q - qm) * (x - xm)).sum(dim, keepdim=True)
            ok = var > 0
            s_new = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), sc)
            m_new = torch.where(ok, xm - s_new * qm, mn)
            s_new, m_new = s_new.half().float(), m_new.half().float()
            okp = s_new > 0
            s_new = torch.where(okp, s_new, sc)
            m_new = torch.where(okp, m_new, mn)
            q2 = _q_sm(x, s_new, m_new, qmax)
            e2 = ((q2 * s_new + m_new - x) ** 2).sum(dim, keepdim=True)
            better = e2 < err
            q = torch.where(better, q2, q)
            sc = torch.where(better, s_new, sc)
            mn = torch.where(better, m_new, mn)
            err = torch.where(better, e2, err)
    s = STATS.setdefault((tag, qmax), [0.0, 0.0])
    s[0] += e0
    s[1] += err.sum().item()
    return q, sc, mn


def hack_q(x, lo, hi, qmax):
    dim = 2 if x.dim() == 4 else -1
    return search(x, lo, hi, qmax, dim, "hackK" if x.dim() == 4 else "hackV")


he._quantize_ref = hack_q
he.CLIP[2] = 0.0  # the repo's own clip off: these rules replace it


def kivi_qg(x, bits, dim, clip=0):
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    if RULE.get("kivi", True):
        q, sc, mn = search(xf, lo, hi, qmax, dim, "kiviK" if dim == 3 else "kiviV")
    else:
        q, sc, mn = _q(xf, lo, hi, qmax)
    return q.to(torch.uint8), sc.half(), mn.half()


qz.quantize_groups = kivi_qg

RULES = {
    "minmax": {"name": "minmax"},
    "sym7": {"name": "sym", "ts": [0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15]},
    "asym": {"name": "asym", "ts": [0, 0.05, 0.1, 0.15, 0.2]},
    "sym7ls": {"name": "sym", "ts": [0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15], "ls": 2},
    "asymls": {"name": "asym", "ts": [0, 0.05, 0.1, 0.15, 0.2], "ls": 2},
    "asym_all": {"name": "asym", "ts": [0, 0.05, 0.1, 0.15, 0.2], "maxq": 15},
    "sym7_all": {"name": "sym", "ts": [0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15], "maxq": 15},
    "sym7_K": {"name": "sym", "ts": [0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15], "kinds": "K"},
    "sym7_V": {"name": "sym", "ts": [0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15], "kinds": "V"},
    "fix10": {"name": "fix", "t": 0.1},
    "fix075": {"name": "fix", "t": 0.075},
    "aciq171": {"name": "aciq", "a": 1.71},
    "aciq2": {"name": "aciq", "a": 2.0},
    "asym_hackonly": {"name": "asym", "ts": [0, 0.05, 0.1, 0.15, 0.2], "kivi": False},
}


def main():
    text, nwin, rules, codecs = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3].split(","),
        sys.argv[4].split(","),
    )
    text_dir = (
        None if text in ("stdlib", "train") else "/tmp/venv/lib/python3.11/site-packages/matplotlib"
    )
    config, net, tok = qb.load()
    if text == "train":
        import random

        docs = list(load_corpus(None).train)
        random.Random(0).shuffle(docs)
        wins = qb.windows(tok, docs[:64], nwin, 1024)
    else:
        wins = qb.windows(tok, load_corpus(text_dir).held_out, nwin, 1024, 0)
    setups = {}

    def ev(codec, variant):
        s = setups.setdefault(codec, qb.Setup(net, config, codec))
        s.codecs.clear()
        t0 = time.time()
        tot, n = qb.nll(s, wins, variant, 512)
        return tot / n, time.time() - t0

    base, _ = ev("hack2", Variant("bf16", "ref", quantize=False))
    print(f"{text} {nwin} windows bf16 nll {base:.5f}", flush=True)
    for rn in rules:
        RULE.clear()
        RULE.update(RULES[rn])
        for c in codecs:
            STATS.clear()
            if c == "kivi2mix":
                v = Variant("kivi2 l5 kivi4", "kivi", overrides=((5, "kivi4", "KV", None),))
                nl, dt = ev("kivi2", v)
            else:
                nl, dt = ev(c, Variant("all", "ref"))
            red = {
                f"{k[0]}{k[1]}": f"{100 * (1 - v[1] / v[0]):.1f}%"
                for k, v in STATS.items()
                if v[0] > 0
            }
            print(
                f"{text} rule={rn:8s} {c:9s} ppl {math.exp(nl):.4f} vs bf16 {100 * (math.exp(nl - base) - 1):+.2f}%  mse_reduction {red}  ({dt:.0f}s)",
                flush=True,
            )


main()
