"""The model's fused elementwise kernels: RMSNorm (+ the residual add before it,
kernels/rms_norm.py), rotary embedding of queries and keys (kernels/rope.py) and the MLP's
silu(gate) * up (kernels/silu_mul.py), each Triton kernel
(the interpreter on CPU) against its torch reference on fresh random, strided inputs, the
references against the formulas by hand in float64, argument checks, and a GPU run at Llama-3-8B's
shapes."""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402
from zipserve.kernels.rms_norm import _rms_norm_kernel, rms_norm, rms_norm_ref  # noqa: E402
from zipserve.kernels.rope import rope_qk, rope_qk_ref  # noqa: E402
from zipserve.kernels.silu_mul import silu_mul, silu_mul_ref  # noqa: E402

DEVICE = "cpu" if is_interpreted(_rms_norm_kernel) else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _assert_same_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit for bit; under the CPU interpreter bfloat16 casts truncate instead of rounding
    to nearest, so there a bfloat16 value may be one unit in the last place off."""
    if DEVICE == "cpu" and got.dtype == torch.bfloat16:
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
        assert ((got.float() - want.float()).abs() <= ulp).all()
    else:
        assert torch.equal(got, want)


def _norm_inputs(gen, t, n, dtype, device=DEVICE):
    """x a column window of a wider buffer (strided rows), residual contiguous, weight ~ 1."""
    x = (torch.randn(t, n + 24, generator=gen) * 3)[:, 8 : n + 8]
    r = torch.randn(t, n, generator=gen)
    w = 1 + 0.1 * torch.randn(n, generator=gen)
    return x.to(device, dtype), r.to(device, dtype), w.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 128), (5, 96), (33, 300)])
def test_rms_norm_matches_reference(dtype, t, n):
    gen = torch.Generator().manual_seed(t * 1000 + n)
    x, r, w = _norm_inputs(gen, t, n, dtype)
    for residual in (None, r):
        out, s = rms_norm(x, w, 1e-5, residual)
        out_r, s_r = rms_norm_ref(x, w, 1e-5, residual)
        assert out.shape == (t, n) and out.dtype == dtype and torch.isfinite(out).all()
        assert _rel_err(out, out_r) < TOL[dtype], (residual is None, _rel_err(out, out_r))
        if residual is None:
            assert s is x and s_r is x
        else:  # the residual stream, rounded as torch's add rounds it
            _assert_same_rounding(s, s_r)


def test_rms_norm_takes_leading_dims():
    """[B, T, N] (a training-style batch): the rows flattened, the shape kept."""
    gen = torch.Generator().manual_seed(4)
    x, r, w = _norm_inputs(gen, 6, 64, torch.float32)
    x3, r3 = x.reshape(2, 3, 64), r.reshape(2, 3, 64)  # a copy: x's rows are strided
    out, s = rms_norm(x3, w, 1e-5, r3)
    want, s_want = rms_norm_ref(x3, w, 1e-5, r3)
    assert out.shape == s.shape == (2, 3, 64)
    assert _rel_err(out, want) < TOL[torch.float32] and torch.equal(s, s_want)


def test_rms_norm_reference_is_the_formula():
    gen = torch.Generator().manual_seed(5)
    x, r, w = _norm_inputs(gen, 4, 64, torch.float32)
    out, s = rms_norm_ref(x, w, 1e-6, r)
    s64 = x.double() + r.double()
    want = w.double() * s64 / torch.sqrt((s64**2).mean(-1, keepdim=True) + 1e-6)
    assert _rel_err(out, want) < 1e-6 and _rel_err(s, s64) < 1e-7


def _rope_inputs(gen, t, h, kvh, d, dtype, device=DEVICE):
    """q, k views of one fused qkv row (strided), positions out of order, fp32 tables."""
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    positions = torch.randperm(4 * t + 7, generator=gen)[:t]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(4 * t + 7).float(), inv)  # [P, D/2]
    return dict(
        positions=positions.to(device),
        q=q.to(device, dtype),
        k=k.to(device, dtype),
        cos=freqs.cos().to(device),
        sin=freqs.sin().to(device),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,kvh,d", [(1, 32, 8, 128), (7, 4, 2, 64), (3, 6, 3, 96)])
def test_rope_matches_reference(dtype, t, h, kvh, d):
    gen = torch.Generator().manual_seed(t + 10 * h + d)
    args = _rope_inputs(gen, t, h, kvh, d, dtype)
    q_out, k_out = rope_qk(**args)
    q_ref, k_ref = rope_qk_ref(**args)
    assert q_out.shape == (t, h, d) and k_out.shape == (t, kvh, d) and q_out.dtype == dtype
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert _rel_err(q_out, q_ref) < TOL[dtype] and _rel_err(k_out, k_ref) < TOL[dtype]
    q_only, none = rope_qk(**{**args, "k": None})  # queries alone (LCKV's read-only layers)
    assert none is None and torch.equal(q_only, q_out)


def test_rope_reference_rotates_pairs_by_their_angle():
    """Channel i and i + D/2 of a head form the pair rotated by angle pos * inv_freq_i; norms keep."""
    gen = torch.Generator().manual_seed(9)
    args = _rope_inputs(gen, 5, 2, 1, 8, torch.float32)
    q_ref, _ = rope_qk_ref(**args)
    q, pos = args["q"].double(), args["positions"]
    ang = torch.atan2(args["sin"].double(), args["cos"].double())[pos][:, None, :]  # [T, 1, 4]
    z = torch.complex(q[..., :4], q[..., 4:]) * torch.exp(1j * ang)
    assert _rel_err(q_ref, torch.cat((z.real, z.imag), -1)) < 1e-6
    assert torch.allclose(q_ref.double().norm(dim=-1), q.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 64), (3, 1500), (17, 96)])
def test_silu_mul_matches_reference(dtype, t, inter):
    gen = torch.Generator().manual_seed(t + inter)
    x = (torch.randn(t, 2 * inter + 16, generator=gen) * 3)[:, 8 : 2 * inter + 8]  # strided rows
    x = x.to(DEVICE, dtype)
    out, ref = silu_mul(x), silu_mul_ref(x)
    assert out.shape == (t, inter) and out.dtype == dtype and out.is_contiguous()
    assert _rel_err(out, ref) < TOL[dtype]
    g, u = x.double()[:, :inter], x.double()[:, inter:]
    assert _rel_err(ref, g * torch.sigmoid(g) * u) < TOL[dtype]  # the formula


def _norm_valid():
    x, r, w = _norm_inputs(torch.Generator().manual_seed(1), 2, 32, torch.float32, "cpu")
    return dict(x=x, weight=w, eps=1e-5, residual=r)


def _rope_valid():
    return _rope_inputs(torch.Generator().manual_seed(2), 3, 4, 2, 16, torch.float32, "cpu")


BAD = [
    (rms_norm_ref, _norm_valid, "x", dict(x=lambda x: x[0, 0])),  # a scalar
    (rms_norm_ref, _norm_valid, "x", dict(x=lambda x: x.t())),  # last dim strided
    (rms_norm_ref, _norm_valid, "weight", dict(weight=lambda w: w[:5])),
    (rms_norm_ref, _norm_valid, "weight", dict(weight=lambda w: w.double())),
    (rms_norm_ref, _norm_valid, "eps", dict(eps=lambda e: 0.0)),
    (rms_norm_ref, _norm_valid, "residual", dict(residual=lambda r: r[:1])),
    (
        silu_mul_ref,
        lambda: dict(gate_up=torch.randn(2, 8)),
        "gate_up",
        dict(gate_up=lambda x: x[0]),
    ),
    (
        silu_mul_ref,
        lambda: dict(gate_up=torch.randn(2, 8)),
        "even",
        dict(gate_up=lambda x: x[:, :7]),
    ),
    (
        silu_mul_ref,
        lambda: dict(gate_up=torch.randn(2, 8)),
        "gate_up",
        dict(gate_up=lambda x: x.t()),
    ),
    (rope_qk_ref, _rope_valid, "q", dict(q=lambda q: q[0])),
    (rope_qk_ref, _rope_valid, "even", dict(q=lambda q: q[..., :15])),
    (rope_qk_ref, _rope_valid, "positions", dict(positions=lambda p: p.float())),
    (rope_qk_ref, _rope_valid, "positions", dict(positions=lambda p: p[:2])),
    (rope_qk_ref, _rope_valid, "k", dict(k=lambda k: k.half())),
    (rope_qk_ref, _rope_valid, "cos", dict(cos=lambda c: c.double())),
    (rope_qk_ref, _rope_valid, "sin", dict(sin=lambda s: s[:, :3])),
]


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize(
    "fn,valid,name,change", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_arguments_raise(kernel, fn, valid, name, change):
    if kernel:
        fn = {rms_norm_ref: rms_norm, rope_qk_ref: rope_qk, silu_mul_ref: silu_mul}[fn]
        if DEVICE == "cuda":
            pytest.skip("argument checks run before the device matters; the CPU run covers them")
    args = valid()
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises(ValueError, match=name):
        fn(**args)


@pytest.mark.gpu
def test_kernels_match_references_on_gpu():
    gen = torch.Generator().manual_seed(17)
    x, r, w = _norm_inputs(gen, 4096, 4096, torch.bfloat16, "cuda")
    for residual in (None, r):
        out, s = rms_norm(x, w, 1e-5, residual)
        out_r, s_r = rms_norm_ref(x, w, 1e-5, residual)
        assert _rel_err(out, out_r) < TOL[torch.bfloat16]
        _assert_same_rounding(s, s_r)
    args = _rope_inputs(gen, 4096, 32, 8, 128, torch.bfloat16, "cuda")
    for got, want in zip(rope_qk(**args), rope_qk_ref(**args)):
        assert _rel_err(got, want) < TOL[torch.bfloat16]
    gate_up = torch.randn(4096, 2 * 14336, generator=gen).to("cuda", torch.bfloat16)
    assert _rel_err(silu_mul(gate_up), silu_mul_ref(gate_up)) < TOL[torch.bfloat16]
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_model_modules_take_the_kernels_on_gpu(monkeypatch):
    """engine/model.py's RMSNorm (plain and with the residual add), RotaryEmbedding and MLP on a GPU:
    the kernels' results, equal (to rounding) to the torch forms ZIPSERVE_NORM_ROPE_KERNELS=0
    runs."""
    from zipserve.engine import model as model_mod
    from zipserve.engine.config import random_model_config

    config = random_model_config("random:llama3-8b")
    gen = torch.Generator().manual_seed(29)
    norm = model_mod.RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(4096, generator=gen)).to("cuda", torch.bfloat16)
    rope = model_mod.RotaryEmbedding(config, 8192).to("cuda")
    x, r, _ = _norm_inputs(gen, 64, 4096, torch.bfloat16, "cuda")
    args = _rope_inputs(gen, 64, 32, 8, 128, torch.bfloat16, "cuda")
    args["positions"] = args["positions"] * 30  # < 8192, the table's positions (263 * 30)

    small = dataclasses.replace(config, hidden_size=256, intermediate_size=384)
    mlp = model_mod.MLP(small).to("cuda", torch.bfloat16)
    h = torch.randn(16, 256, generator=gen).to("cuda", torch.bfloat16)

    def run():
        return (
            norm(x),
            *norm.add_and_norm(x, r),
            *rope(args["positions"], args["q"], args["k"]),
            rope.rotate(args["positions"], args["q"]),
            mlp(h),
        )

    monkeypatch.setattr(model_mod, "NORM_ROPE_KERNELS", True)  # the default
    with torch.inference_mode():  # the engine's forward runs in inference mode
        fused = run()
        monkeypatch.setattr(model_mod, "NORM_ROPE_KERNELS", False)
        plain = run()
    x.requires_grad_(True)  # training keeps the torch forms, which have a backward
    monkeypatch.setattr(model_mod, "NORM_ROPE_KERNELS", True)
    norm(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.cuda.synchronize()
    for got, want in zip(fused, plain):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel_err(got, want) < TOL[torch.bfloat16]
