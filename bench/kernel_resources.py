"""`python3 -m zipserve.bench.kernel_resources`: registers and spills of the Triton kernels on sm_90,
compiled offline on the CPU (no GPU needed).

Each kernel whose resources decide its speed is compiled for an H100 (sm_90) at its serving shape
(random Llama-3-8B: head_dim 128, pages of 64 tokens, GQA group 4, bf16) with the ptxas and
cuobjdump bundled in the triton wheel, as a launch would specialize it (16-byte aligned pointers,
strides divisible by 16). The table gives registers per thread and stack bytes (spills) per
thread; a kernel over its stack allowance fails the run (exit 1) and tests/test_kernel_resources.py.
Why it exists: session 18 found the lowrank encoder compiled to 32 registers and ~9 KB of stack
per thread (an `ieee` fp32 dot), 150 us for 8 pages, which nothing had flagged.

The device machines run an older triton than the CPU machines (3.6 vs 3.9 in session 18); the
numbers can differ by a few registers between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes per thread: spills (and local arrays)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one shape: its pointer arguments' types, constexprs, non-int32 scalars, and
    the launch's warps / stages as its wrapper picks them."""

    name: str
    kernel: Callable[[], object]  # the JITFunction (imported late: the modules import torch)
    pointers: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 1
    scalars: dict[str, str] = field(default_factory=dict)  # default i32
    max_stack: int = 0


def cuobjdump() -> str:
    """The cuobjdump the triton wheel ships (ValueError naming the path when it has none)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(path, os.X_OK):
        raise ValueError(f"no cuobjdump in the triton wheel at {path}: cannot read sm_90 resources")
    return path


def compile_sm90(spec: KernelSpec) -> Resources:
    """Compile spec's kernel for sm_90 and read its registers and stack. Needs the kernels as
    compiled functions: a process with TRITON_INTERPRET=1 set before they were imported has
    interpreted ones (ValueError; run_isolated runs this in a clean process)."""
    fn = spec.kernel()
    if not hasattr(fn, "params"):
        raise ValueError(
            f"{spec.name}: the kernel is interpreted (TRITON_INTERPRET=1 when it was imported): "
            "compile it in a process without it (kernel_resources.run_isolated)"
        )
    signature = {}
    for p in fn.params:
        if p.name in spec.constexprs:
            signature[p.name] = "constexpr"
        elif p.name in spec.pointers:
            signature[p.name] = spec.pointers[p.name]
        elif p.name.endswith("_ptr"):
            raise ValueError(f"{spec.name}: no type given for pointer argument {p.name}")
        else:
            signature[p.name] = spec.scalars.get(p.name, "i32")
    aligned = {  # what the launcher specializes at run time
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(fn.params)
        if signature[p.name].startswith("*")
        or (signature[p.name] == "i32" and p.name.startswith("stride"))
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=aligned)
    compiled = triton.compile(
        src, target=SM90, options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        raise ValueError(f"{spec.name}: no resource line in cuobjdump's output: {usage[:200]!r}")
    return Resources(int(m.group(1)), int(m.group(2)))


def _k(module: str, name: str) -> Callable[[], object]:
    def load():
        import importlib

        return getattr(importlib.import_module(f"zipserve.kernels.{module}"), name)

    return load


_PAGE, _D, _G = 64, 128, 4
_HACK_PTRS = dict(
    q_ptr="*fp32",
    kc_ptr="*u8",
    vc_ptr="*u8",
    ks_ptr="*fp16",
    km_ptr="*fp16",
    vs_ptr="*fp16",
    vm_ptr="*fp16",
    vsum_ptr="*fp32",
    pt_ptr="*i32",
    np_ptr="*i32",
    dk_ptr="*bf16",
    dv_ptr="*bf16",
    dl_ptr="*i32",
    qd_ptr="*bf16",
    drow_ptr="*i32",
    dstart_ptr="*i32",
    part_ptr="*fp32",
    lse_ptr="*fp32",
    rot_ptr="*fp32",
    qrot_ptr="*fp32",
)


def _hack_decode(
    head_dim: int, bits: int, max_stack: int, write_qrot: bool = False, hadamard: bool = False
) -> KernelSpec:
    """write_qrot: the launch the CUDA backend makes for the tail alone, which also writes q R
    (hadamard: by the butterfly, R being the codec's own Hadamard tensor)."""
    from zipserve.kernels import hack_decode_attention as hd
    from zipserve.kernels.head_dim import block_d

    n_pages, gp, warps, stages = hd._launch_config(_G, _PAGE, head_dim, bits)
    dep = hd.plane_width(head_dim, bits)
    return KernelSpec(
        f"hack_decode (Triton) hack{bits}, head_dim {head_dim}"
        + (", tail + q R" if write_qrot else "")
        + (" (butterfly)" if hadamard else ""),
        _k("hack_decode_kernel", "_hack_decode_kernel"),
        _HACK_PTRS,
        dict(
            G=_G,
            GP=gp,
            NP=n_pages,
            PAGE=_PAGE,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d(head_dim),
            DEP=dep,
            BITS=bits,
            GV=head_dim * bits // 8,
            NUM_SPLITS=8,
            INT8=False,
            INT8_QK_DOT=dep >= 32,
            DENSE_BLOCK=64,
            DOT_PREC="tf32",
            FAST=True,
            WRITE_QROT=write_qrot,
            QROT_HADAMARD=head_dim if hadamard else 0,
        ),
        warps,
        stages,
        scalars=dict(qk_scale="fp32"),
        max_stack=max_stack,
    )


def _decode_baselines() -> list[KernelSpec]:
    """bf16's paged decode kernel and fp8's / KIVI's decode on codes, as their wrappers launch
    them for bf16 queries."""
    import torch

    from zipserve.kernels import fp8_decode_attention as fp8
    from zipserve.kernels import kivi_decode_attention as kivi
    from zipserve.kernels import paged_decode_attention as paged

    split = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16", q_ptr="*bf16")
    tail = dict(pt_ptr="*i32", np_ptr="*i32", dk_ptr="*bf16", dv_ptr="*bf16", dl_ptr="*i32")
    common = dict(G=_G, G_PAD=16, HEAD_DIM=_D, BLOCK_D=_D, NUM_SPLITS=4, DOT_PREC="tf32")
    block_n, chunk, w_paged, s_paged = paged._launch_config(_D, _PAGE, torch.bfloat16)
    np_fp8, w_fp8, s_fp8 = fp8._launch_config(_D, _PAGE, torch.bfloat16)
    np_kivi, w_kivi, s_kivi = kivi._launch_config(_D, _PAGE)
    return [
        KernelSpec(
            "paged_decode (bf16)",
            _k("paged_decode_attention", "_paged_decode_kernel"),
            dict(split, k_ptr="*bf16", v_ptr="*bf16", pt_ptr="*i32", lens_ptr="*i32"),
            dict(common, PAGE_SIZE=_PAGE, BLOCK_N=block_n, CHUNK=chunk),
            w_paged,
            s_paged,
            scalars=dict(qk_scale="fp32"),
        ),
        KernelSpec(
            "fp8_decode",
            _k("fp8_decode_attention", "_fp8_decode_kernel"),
            {
                **split,
                **tail,
                "k_ptr": "*fp8e4nv",
                "ks_ptr": "*fp32",
                "v_ptr": "*fp8e4nv",
                "vs_ptr": "*fp32",
            },
            dict(common, PAGE=_PAGE, NP=np_fp8, DENSE_BLOCK=64),
            w_fp8,
            s_fp8,
            scalars=dict(qk_scale="fp32"),
            max_stack=16,  # triton 3.9 holds it to 128 registers and spills 16 B; 3.6: 147, none
        ),
        KernelSpec(
            "kivi_decode kivi2",
            _k("kivi_decode_kernel", "_kivi_decode_kernel"),
            dict(
                **split,
                **tail,
                kc_ptr="*u8",
                ks_ptr="*fp16",
                km_ptr="*fp16",
                vc_ptr="*u8",
                vs_ptr="*fp16",
                vm_ptr="*fp16",
            ),
            dict(
                common, PAGE=_PAGE, NP=np_kivi, BITS=2, TG=32, CG=32, DENSE_BLOCK=64, DQ_F32=False
            ),
            w_kivi,
            s_kivi,
            scalars=dict(qk_scale="fp32"),
        ),
    ]


def specs() -> list[KernelSpec]:
    """The kernels checked, at the serving shape."""
    encoders = dict(k_ptr="*bf16", v_ptr="*bf16", ids_ptr="*i64", src_ptr="*i32")
    out = [
        KernelSpec(
            "lowrank_encode (r 48 / 40, width 64)",
            _k("lowrank_encode", "_lowrank_encode_kernel"),
            dict(
                encoders,
                kb_ptr="*fp32",
                vb_ptr="*fp32",
                ok_ptr="*fp32",
                ov_ptr="*fp32",
                skip_ptr="*i64",
            ),
            dict(
                PAGE=_PAGE,
                HEAD_DIM=_D,
                BLOCK_D=_D,
                RK=48,
                RV=40,
                WK=64,
                WV=64,
                CK_PAD=64,
                CV_PAD=64,
                V_PROJ=True,
                V_COLS=_D,
                PREC="tf32x3",
            ),
            4,
        ),
        KernelSpec(
            "lowrank_tail_merge (17 partials)",
            _k("lowrank_tail_merge", "_lowrank_tail_merge_kernel"),
            dict(
                q_ptr="*bf16",
                dk_ptr="*bf16",
                dv_ptr="*bf16",
                dl_ptr="*i32",
                rows_ptr="*i32",
                start_ptr="*i32",
                op_ptr="*fp32",
                lp_ptr="*fp32",
                rot_ptr="*fp32",
                out_ptr="*bf16",
            ),
            dict(
                G=_G,
                G_PAD=16,
                HEAD_DIM=_D,
                BLOCK_D=_D,
                BLOCK_T=64,
                W_PAD=64,  # lowrank+hack2's width on Llama-3-8B, its pages' output rotated back
                NUM_PARTS=17,  # HACK's unmerged partials: 16 page splits and the tail program
                S_PAD=32,
                ROTATE=True,
                UPCAST=False,
                DOT_PREC="tf32",
            ),
            8,  # with the rotation (4 without)
            2,
            scalars=dict(qk_scale="fp32"),
        ),
        KernelSpec(
            "fp8_encode",
            _k("fp8_encode", "_fp8_encode_kernel"),
            dict(encoders, kc_ptr="*u8", vc_ptr="*u8", ks_ptr="*fp32", vs_ptr="*fp32"),
            dict(PAGE=_PAGE, HEAD_DIM=_D, BLOCK_P=_PAGE, BLOCK_D=_D, SOFT_CVT=False),
            8,
        ),
    ]
    for bits in (2, 4):
        out.append(
            KernelSpec(
                f"kivi_encode kivi{bits}",
                _k("kivi_encode", "_kivi_encode_kernel"),
                dict(
                    encoders,
                    kc_ptr="*u8",
                    ks_ptr="*fp16",
                    km_ptr="*fp16",
                    vc_ptr="*u8",
                    vs_ptr="*fp16",
                    vm_ptr="*fp16",
                ),
                dict(PAGE=_PAGE, HEAD_DIM=_D, BITS=bits, TG=32, CG=32, CLIP=0.0),
                8,
            )
        )
    out += [  # the model's fused elementwise kernels at Llama-3-8B's shapes, bf16
        KernelSpec(
            "rms_norm (+ residual add)",
            _k("rms_norm", "_rms_norm_kernel"),
            dict(x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", s_ptr="*bf16"),
            dict(HAS_RES=True, BLOCK=4096),
            16,
            scalars=dict(eps="fp32"),
        ),
        KernelSpec(
            "rope_qk",
            _k("rope", "_rope_qk_kernel"),
            dict(
                pos_ptr="*i64",
                q_ptr="*bf16",
                k_ptr="*bf16",
                cos_ptr="*fp32",
                sin_ptr="*fp32",
                qo_ptr="*bf16",
                ko_ptr="*bf16",
            ),
            dict(H=32, H_PAD=32, KVH=8, KVH_PAD=8, HALF=64, HALF_PAD=64, HAS_K=True),
            4,
        ),
        *[  # the codec's own Hadamard tensor takes the butterfly instead of reading R
            KernelSpec(
                "merge_rotated (+ lse_out)" + (", Hadamard butterfly" if block else ""),
                _k("rotated_merge", "_merge_rotated_kernel"),
                dict(
                    part_ptr="*fp32",
                    lse_ptr="*fp32",
                    rot_ptr="*fp32",
                    out_ptr="*bf16",
                    lse_out_ptr="*fp32",
                ),
                dict(
                    NUM_PARTS=9,
                    S_PAD=16,
                    HEAD_DIM=_D,
                    BLOCK_D=_D,
                    BLOCK_J=32,
                    WRITE_LSE=True,
                    HADAMARD=block,
                ),
                4,
            )
            for block in (0, _D)
        ],
        KernelSpec(
            "silu_mul",
            _k("silu_mul", "_silu_mul_kernel"),
            dict(x_ptr="*bf16", out_ptr="*bf16"),
            dict(BLOCK=1024),
            4,
        ),
        KernelSpec(  # the compressed cache's decode step: the new K/V into the 16-bit tail
            "write_tail (+ sink column)",
            _k("tail_write", "_write_tail_kernel"),
            dict(
                tail_ptr="*bf16",
                k_ptr="*bf16",
                v_ptr="*bf16",
                slots_ptr="*i64",
                open_ptr="*i64",
                sink_ptr="*i64",
            ),
            dict(HEAD_DIM=_D, BLOCK_D=_D, HAS_SINK=True),
            1,
        ),
        KernelSpec(  # lowrank+hack2's decode step: the query into the pages' basis (W 64, G 4)
            "project_query (G 4, W 64)",
            _k("page_query", "_project_query_kernel"),
            dict(q_ptr="*bf16", basis_ptr="*fp32", out_ptr="*fp32"),
            dict(G=4, G_PAD=4, HEAD_DIM=_D, WIDTH=64, W_PAD=64, BLOCK_K=32),
            4,
        ),
    ]
    out += [  # every decode kernel's split merge, with lse_out written (lowrank+hack's call) and not
        KernelSpec(
            "merge_splits" + (" (+ lse_out)" if write else ""),
            _k("paged_decode_attention", "_merge_splits_kernel"),
            dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16", lse_out_ptr="*fp32"),
            dict(NUM_SPLITS=9, S_PAD=16, HEAD_DIM=_D, BLOCK_D=_D, WRITE_LSE=write),
            2,
        )
        for write in (True, False)
    ]
    out += _decode_baselines()
    # The Triton HACK decode kernel runs at 255 registers and spills a little at head_dim 128
    # (the CUDA kernel serves that shape on an H100); lowrank+hack2's width 64 runs it.
    out += [_hack_decode(128, 2, max_stack=128), _hack_decode(64, 2, max_stack=128)]
    out += [_hack_decode(128, 2, max_stack=128, write_qrot=True, hadamard=h) for h in (False, True)]
    return out


def run_isolated(code: str, timeout: float = 600.0) -> object:
    """Run `code` (Python that prints one JSON value last) in a fresh interpreter without
    TRITON_INTERPRET, so the kernels import compiled; returns the JSON value."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"offline compile failed (rc {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    args = ap.parse_args(argv)
    if args.json:
        rows = []
        for spec in specs():
            r = compile_sm90(spec)
            rows.append(dict(name=spec.name, max_stack=spec.max_stack, **dataclasses.asdict(r)))
        print(json.dumps(rows))
        return 0
    print(f"triton {triton.__version__}, sm_90, offline\n")
    print("| kernel | warps | registers | stack bytes | allowed |")
    print("|---|---|---|---|---|")
    over = 0
    for spec in specs():
        r = compile_sm90(spec)
        over += r.stack > spec.max_stack
        flag = "" if r.stack <= spec.max_stack else " **over**"
        print(
            f"| {spec.name} | {spec.num_warps} | {r.registers} | {r.stack}{flag} | "
            f"{spec.max_stack} |",
            flush=True,
        )
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
