"""compress/rotation.py's hadamard_block: only the tensor `hadamard` returned is known to be the
Hadamard rotation (the merge kernel then uses its butterfly), and the butterfly equals x @ R."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede importing triton / the kernels

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from zipserve.compress.rotation import hadamard, hadamard_block  # noqa: E402
from zipserve.kernels.hadamard_butterfly import hadamard_rotate, hadamard_rotate_rows  # noqa: E402
from zipserve.kernels.head_dim import block_d  # noqa: E402


def test_only_hadamards_own_tensor_has_a_block():
    for d, block in ((128, 128), (96, 32), (64, 64), (160, 32), (8, 8)):
        r = hadamard(d)
        assert hadamard(d) is r and hadamard_block(r) == block
        assert hadamard_block(r.clone()) is None  # equal values, not the same tensor
    assert hadamard_block(torch.eye(4)) is None
    assert hadamard_block(torch.ones(4, 8)) is None


@triton.jit
def _rotate_rows(x_ptr, y_ptr, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BD)
    x = tl.load(x_ptr + tl.program_id(0) * D + offs, mask=offs < D, other=0.0)
    y = hadamard_rotate(x, BD, BLOCK)
    tl.store(y_ptr + tl.program_id(0) * D + offs, y, mask=offs < D)


@pytest.mark.parametrize("d", [64, 96, 128, 160, 256])
def test_butterfly_equals_the_matrix(d):
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(d))
    y = torch.full_like(x, float("nan"))
    _rotate_rows[(3,)](x, y, D=d, BD=block_d(d), BLOCK=hadamard_block(hadamard(d)))
    want = x @ hadamard(d)
    assert ((y - want).norm() / want.norm()).item() < 1e-6


@triton.jit
def _rotate_tile(x_ptr, y_ptr, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, 16)
    offs = tl.arange(0, BD)
    ptrs = rows[:, None] * D + offs[None, :]
    x = tl.load(x_ptr + ptrs, mask=(offs < D)[None, :], other=0.0)  # [16, BD]
    tl.store(y_ptr + ptrs, hadamard_rotate_rows(x, 16, BD, BLOCK), mask=(offs < D)[None, :])


@pytest.mark.parametrize("d", [64, 96, 128])
def test_row_butterfly_equals_the_matrix(d):
    x = torch.randn(16, d, generator=torch.Generator().manual_seed(d + 1))
    y = torch.full_like(x, float("nan"))
    _rotate_tile[(1,)](x, y, D=d, BD=block_d(d), BLOCK=hadamard_block(hadamard(d)))
    want = x @ hadamard(d)
    assert ((y - want).norm() / want.norm()).item() < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_hadamard_is_one_tensor_per_device():
    """ "cuda" and "cuda:N" name one device: one tensor, which hadamard_block recognises."""
    r = hadamard(128, "cuda")
    assert r is hadamard(128, torch.device("cuda", torch.cuda.current_device()))
    assert hadamard_block(r) == 128 and torch.equal(r.cpu(), hadamard(128))
    assert hadamard_block(r.clone()) is None
