"""Layer 5's K alone in 4 bits (V in 2), HACK vs KIVI, both with the 0.1 range clip (issue 19).

    OMP_NUM_THREADS=1 PYTHONPATH=<parent of zipserve> python layer5_k_only.py 41
    OMP_NUM_THREADS=1 PYTHONPATH=<parent of zipserve> python layer5_k_only.py 19 <matplotlib dir>
(log: after/layer5_k_only.log)
"""

import sys

import torch

from zipserve.bench import quality_breakdown as qb
from zipserve.bench.kivi_equal_bytes import _register, _unregister, clipped_codecs

torch.set_num_threads(1)
n, text_dir = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
_register()
try:
    for base, up in (("hack2", "hack4"), ("kivi2", "kivi4")):
        v = qb.Variant(f"{base}, layer 5 K in {up}", "split", overrides=((5, up, "K", None),))
        qb.run(
            base,
            qb.DEFAULT_MODEL,
            n,
            1024,
            512,
            text_dir,
            None,
            (),
            extra=[v],
            codecs=clipped_codecs(qb.DEFAULT_MODEL, 0.1),
        )
finally:
    _unregister()
