"""Session 28, CPU: kernels/row_copy.py's kernel compiled for sm_90 without a GPU (the ptxas inside
the triton wheel, ../shared/tools/kernel-lab/offline_sass.py's helper): registers, stack (spills)
and the global loads / stores in the SASS, for 4-byte and 1-byte words.

Run: PYTHONPATH=<dir holding zipserve> TRITON_DEFAULT_FP_FUSION=1 python3 sass_row_copy.py
Output: sass_row_copy.txt beside this file.
"""

import collections
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zipserve.kernels.row_copy import BLOCK, FIELDS, _copy_rows_kernel

sys.path.insert(0, "/work/shared/tools/kernel-lab")
from offline_sass import _sass  # noqa: E402

SIGNATURE = {
    "table_ptr": "*i64",
    "num_jobs": "i32",
    "NUM_FIELDS": "constexpr",
    "WORD_TYPE": "constexpr",
    "BLOCK_WORDS": "constexpr",
}

for word in (tl.int32, tl.uint8):
    src = ASTSource(
        fn=_copy_rows_kernel,
        signature=SIGNATURE,
        constexprs={"NUM_FIELDS": FIELDS, "WORD_TYPE": word, "BLOCK_WORDS": BLOCK},
        attrs={(0,): [["tt.divisibility", 16]]},
    )
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    res, sass = _sass(k)
    regs = re.search(r"REG:(\d+)", res).group(1)
    stack = re.search(r"STACK:(\d+)", res).group(1)
    memory = collections.Counter(re.findall(r"\b((?:LDG|STG)[.\w]*)", sass))
    print(word, "regs", regs, "stack", stack, dict(memory))
