"""lowrank+hack2mix / lowrank+hack2 with HACK's 2-bit range clip (0.1, the default) and without
(0), every held-out window, bench/quality_breakdown.py's forward (issue 19).

    OMP_NUM_THREADS=1 PYTHONPATH=<parent of zipserve> python lowrank_hack_clip.py 41 [text_dir]
(log: after/lowrank_hack_clip_<text>.log)
"""

import sys

import torch

from zipserve.bench import quality_breakdown as qb
from zipserve.kernels import hack_encode

torch.set_num_threads(1)
n, text_dir = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
default = hack_encode.CLIP[2]
for codec in ("lowrank+hack2mix", "lowrank+hack2"):
    for clip in (default, 0.0):
        hack_encode.CLIP[2] = clip  # read when the codec's HackCodecs are built
        print(f"== {codec}, 2-bit range clip {clip}", flush=True)
        qb.run(codec, qb.DEFAULT_MODEL, n, 1024, 512, text_dir, None, ())
hack_encode.CLIP[2] = default
