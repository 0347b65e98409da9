"""The Triton kernels whose resources decide their speed compile for sm_90 (offline, on the CPU,
with the triton wheel's own ptxas) within their stack allowance: no spills where none are
allowed. Session 18 found the lowrank encoder at ~9 KB of stack per thread (an ieee fp32 dot);
the second test shows this check catches exactly that. The compiles run in a clean process (the
suite imports the kernels interpreted)."""

from __future__ import annotations

import pytest

from zipserve.bench import kernel_resources as kr

pytestmark = pytest.mark.slow  # ~1 min of compiles on 2 cores (cached after)


def test_kernels_compile_for_sm90_within_their_stack_allowance():
    rows = kr.run_isolated("from zipserve.bench.kernel_resources import main; main(['--json'])")
    assert [r["name"] for r in rows] == [s.name for s in kr.specs()]
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["stack"] <= r["max_stack"], r


def test_the_check_catches_a_spilling_kernel():
    """The lowrank encoder's projection in ieee fp32 (what it was before session 18) spills."""
    stack = kr.run_isolated(
        "import dataclasses, json\n"
        "from zipserve.bench import kernel_resources as kr\n"
        "spec = next(s for s in kr.specs() if s.name.startswith('lowrank_encode'))\n"
        "spec = dataclasses.replace(spec, constexprs={**spec.constexprs, 'PREC': 'ieee'})\n"
        "print(json.dumps(kr.compile_sm90(spec).stack))\n"
    )
    assert stack > 1024


def test_a_pointer_without_a_type_is_named():
    err = kr.run_isolated(
        "import dataclasses, json\n"
        "from zipserve.bench import kernel_resources as kr\n"
        "spec = kr.specs()[0]\n"
        "spec = dataclasses.replace(spec, pointers={k: v for k, v in spec.pointers.items()"
        " if k != 'k_ptr'})\n"
        "try:\n"
        "    kr.compile_sm90(spec)\n"
        "    print(json.dumps(''))\n"
        "except ValueError as e:\n"
        "    print(json.dumps(str(e)))\n"
    )
    assert "k_ptr" in err
