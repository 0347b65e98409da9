"""The low-rank codecs' calibrated bases (lowrank.safetensors beside a checkpoint, cut to the ranks
of lowrank.json or another codec's), or random orthonormal ones for random-weight benchmarks. The
codecs that use them: compress/lowrank.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

BASES_FILE = "lowrank.safetensors"


class LowRankBases:
    """Per layer and KV head, [KVH, D, r] matrices: k_enc stores keys (k @ k_enc), k_dec projects
    queries (q @ k_dec) so that q_red . k_red ~= q . k; v_enc stores values, v_dec lifts them back
    (v ~= (v @ v_enc) @ v_dec^T); dec^T enc = I."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], info: dict):
        self.layers, self.info = layers, info

    @classmethod
    def load(
        cls, model_dir: str | Path, ranks: tuple[Sequence[int], Sequence[int]] | None = None
    ) -> LowRankBases:
        """The calibrated bases beside a checkpoint, cut to `lowrank`'s ranks (lowrank.json's
        k_ranks / v_ranks) or to `ranks` (r_k, r_v per layer: another codec's, e.g.
        lowrank+hack2mix's widths). The file holds each layer's bases at full rank, columns by
        falling energy (files of earlier calibrations: cut to lowrank's ranks, which then bound
        any other). For a `random:NAME` model (random weights, nothing to calibrate on) random
        ones, see `random_for`."""
        if str(model_dir).startswith("random:"):
            return cls.random_for(str(model_dir), ranks=ranks)
        path = Path(model_dir) / BASES_FILE
        if not path.is_file():
            raise ValueError(
                f"codec: lowrank needs {path}; create it with "
                f"`zipserve calibrate --model {model_dir}`"
            )
        t = load_file(str(path))
        n = len([k for k in t if k.endswith(".k_enc")])
        info_path = Path(model_dir) / "lowrank.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        names = ("k_enc", "k_dec", "v_enc", "v_dec")
        layers = [{m: t[f"layers.{i}.{m}"] for m in names} for i in range(n)]
        rk, rv = ranks or (info.get("k_ranks"), info.get("v_ranks"))
        if rk is None or rv is None:  # no ranks recorded: the file's own
            return cls(layers, info)
        if len(rk) != n or len(rv) != n:
            raise ValueError(
                f"codec: ranks for {len(rk)} / {len(rv)} layers, {path} holds {n}; "
                f"calibrate again (`zipserve calibrate --model {model_dir}`)"
            )
        for i, layer in enumerate(layers):
            for side, r in (("k", rk[i]), ("v", rv[i])):
                have = layer[f"{side}_enc"].shape[2]
                if not 1 <= r <= have:
                    raise ValueError(
                        f"codec: layer {i} {side.upper()} needs rank {r}, {path} holds "
                        f"{have}; calibrate again (`zipserve calibrate --model {model_dir}`)"
                    )
                for m in (f"{side}_enc", f"{side}_dec"):
                    layer[m] = layer[m][:, :, :r].contiguous()
        return cls(layers, dict(info, k_ranks=list(rk), v_ranks=list(rv)))

    @classmethod
    def random(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        rk: int | Sequence[int],
        rv: int | Sequence[int],
        seed: int = 0,
    ) -> LowRankBases:
        """Random orthonormal bases (enc == dec) of ranks rk / rv (one for all layers, or one
        per layer): for benchmarks on random weights, where there is nothing to calibrate on."""
        g = torch.Generator().manual_seed(seed)
        rk = [rk] * num_layers if isinstance(rk, int) else list(rk)
        rv = [rv] * num_layers if isinstance(rv, int) else list(rv)

        def basis(r):  # [KVH, D, r] orthonormal columns
            q, _ = torch.linalg.qr(
                torch.randn(num_kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64)
            )
            return q[:, :, :r].float().contiguous()

        layers = []
        for i in range(num_layers):
            bk, bv = basis(rk[i]), basis(rv[i])
            layers.append({"k_enc": bk, "k_dec": bk, "v_enc": bv, "v_dec": bv})
        return cls(layers, {"random": True, "k_ranks": rk, "v_ranks": rv})

    @classmethod
    def random_for(
        cls,
        model: str,
        budget: float = 0.5,
        seed: int = 0,
        ranks: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> LowRankBases:
        """Random orthonormal bases of uniform rank round(budget * head_dim) (or of `ranks`, per
        layer) for K and V of every layer of the `random:NAME` model: the bytes and the work of
        a calibrated codec at that budget, for speed benchmarks on random weights; quality means
        nothing here."""
        from zipserve.engine.config import random_model_config

        cfg = random_model_config(model)
        d = cfg.head_dim
        r = max(1, round(budget * d))
        rk, rv = ranks or (r, r)
        bases = cls.random(cfg.num_layers, cfg.num_kv_heads, d, rk, rv, seed)
        what = f"rank {r} of {d}" if ranks is None else f"ranks {list(rk)} / {list(rv)} of {d}"
        bases.info.update(
            budget=budget,
            head_dim=d,
            basis=f"random orthonormal, {what} (random weights: speed benchmarks only)",
        )
        return bases
