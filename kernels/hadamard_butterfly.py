"""x @ R for R the codec's Hadamard rotation (compress/rotation.py: block-diagonal Sylvester blocks
of BLOCK, scaled by 1 / sqrt(BLOCK)) as a fast Walsh-Hadamard butterfly in registers: log2(BLOCK)
add / subtract stages, no D x D matrix read. For kernels whose caller passed the very tensor
`hadamard` returned (`hadamard_block` tells); tests compare it with x @ hadamard(D).
"""

import triton
import triton.language as tl


@triton.jit
def _butterfly_stage_rows(x, R: tl.constexpr, BD: tl.constexpr, S: tl.constexpr):
    """One stage on every row of x [R, BD]: elements i and i + S of every 2S-aligned pair
    become (a + b, a - b)."""
    x4 = tl.permute(tl.reshape(x, (R, BD // (2 * S), 2, S)), (0, 1, 3, 2))  # [R, n, S, 2]
    a, b = tl.split(x4)  # [R, n, S] each
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, BD))


@triton.jit
def hadamard_rotate_rows(x, R: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    """hadamard_rotate on every row of x [R, BD] fp32."""
    for i in tl.static_range(8):  # stage half-sizes 128, 64, ..., 1: those inside a block
        if (128 >> i) < BLOCK:
            x = _butterfly_stage_rows(x, R, BD, 128 >> i)
    return x * (1.0 / tl.sqrt(BLOCK * 1.0))


@triton.jit
def hadamard_rotate(x, BD: tl.constexpr, BLOCK: tl.constexpr):
    """x [BD] fp32 -> x @ blockdiag(H_BLOCK) / sqrt(BLOCK) (BD, BLOCK powers of two, BLOCK <= BD,
    BLOCK <= 256). BLOCK divides the head dim, so padding channels past it (zeros) form blocks of
    their own and stay zero."""
    return tl.reshape(hadamard_rotate_rows(tl.reshape(x, (1, BD)), 1, BD, BLOCK), (BD,))
