"""CPU-only resource report of the prebuilt CUDA cubins (kernels/cuda/): registers, stack (spills)
and the hottest loop's static instruction mix per function, with no GPU.

`python3 -m zipserve.bench.cuda_sass_report [CUBIN]` (default: kernels/cuda/hack_decode_sm90.cubin).
Uses the cuobjdump shipped inside the triton wheel. For the HACK decode kernels one loop trip is one
64-token page of one KV head for one warp, so "per token-head" = loop instructions / 64.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import triton

from zipserve.kernels.cuda_driver import cubin_path

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_ADDR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/")
_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def report(path: str) -> str:
    sass = subprocess.run([_BIN, "-sass", path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run(
        [_BIN, "--dump-resource-usage", path], capture_output=True, text=True, check=True
    ).stdout
    usage = {}
    for name, regs, stack in re.findall(r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+)", res):
        usage[name] = (int(regs), int(stack))
    lines_out = []
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name = chunk.split("\n")[0].strip()
        lines = [ln for ln in chunk.splitlines() if _ADDR.match(ln)]
        addr = [int(_ADDR.match(ln).group(1), 16) for ln in lines]
        body: list[str] = []
        for i, ln in enumerate(lines):  # the longest conditional backward branch: the page loop
            # (unconditional ones jump back from out-of-line paths such as BRA.DIV fallbacks)
            m = re.search(r"@!?P\d\s+BRA\b.*?(0x[0-9a-f]+)", ln)
            if m and int(m.group(1), 16) < addr[i]:
                loop = [x for x, a in zip(lines, addr) if int(m.group(1), 16) <= a <= addr[i]]
                body = max(body, loop, key=len)
        ops = collections.Counter(_OP.findall("\n".join(body)))
        regs, stack = usage.get(name, (0, 0))
        lines_out.append(
            f"{name}: {regs} registers, {stack} B stack; page loop {len(body)} instructions per "
            f"warp = {len(body) / 64:.1f} warp-instructions per token-head; "
            + ", ".join(f"{o} {c}" for o, c in ops.most_common(10))
        )
    return "\n".join(sorted(lines_out))


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else str(cubin_path("hack_decode_sm90.cubin"))))
