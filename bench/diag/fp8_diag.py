"""Where fp8's encode kernel and its torch reference differ on a GPU, at the GPU test's shape:
per store tensor, the bytes that differ (hardware and integer conversions), the first few with
their values, and the pages they are in. Run from the repository root with the package on
PYTHONPATH (it imports the test's page builders): `python3 bench/diag/fp8_diag.py`. Session 19
(H100) found the reference's scale 1 ulp off (CUDA divides by a Python scalar via its
reciprocal) and fixed the reference; bench/results/session19_h100/followup.log."""

import sys

import torch

sys.path.insert(0, "tests")
from test_fp8_encode import CODES, _encode_both, _pages, _sentinel_store  # noqa: E402

from zipserve.kernels.fp8_encode import _launch  # noqa: E402


def main() -> None:
    gen = torch.Generator().manual_seed(7)
    n, kvh, p, d, n_pool = 32, 8, 64, 128, 48
    k, v = _pages(gen, n, kvh, p, d, torch.bfloat16, device="cuda")
    ids = torch.randperm(n_pool, generator=gen)[:n].cuda()
    got, want = _encode_both(k, v, ids, n_pool)  # hardware conversion, reference
    soft = _sentinel_store(kvh, p, d, n_pool, "cuda")
    _launch(k, v, soft, ids, None, None, soft_cvt=True)  # integer conversion
    torch.cuda.synchronize()
    for name in CODES:
        hw, ref, sw = (s[name].view(torch.uint8) for s in (got, want, soft))
        diff = hw != ref
        print(
            name, "hw!=ref", int(diff.sum()), "soft!=ref", int((sw != ref).sum()), "of", hw.numel()
        )
        for t in map(tuple, diff.nonzero()[:8].tolist()):
            hv, rv = float(got[name][t].float()), float(want[name][t].float())
            print("  ", t, "hw", int(hw[t]), hv, "ref", int(ref[t]), rv, "soft", int(sw[t]))
        if diff.any():
            print("  pages with diffs", diff.flatten(1).any(1).nonzero().flatten().tolist()[:20])
    for name in ("k_scale", "v_scale"):
        hw, ref, sw = got[name], want[name], soft[name]
        rel = float(((hw - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        print(
            name,
            "hw!=ref",
            int((hw != ref).sum()),
            "soft!=ref",
            int((sw != ref).sum()),
            "maxrel",
            rel,
        )


if __name__ == "__main__":
    main()
