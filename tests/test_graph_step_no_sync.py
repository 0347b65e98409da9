"""Sealing a decode step's filled pages (the codec work a CUDA graph captures) makes no host
wait, for every codec: on the CPU each codec runs its torch reference, which a GPU runs too where
its Triton kernel does not take the shape (KIVI at head_dim 96). Session 26's H100 run failed 23
GPU tests from one such wait: KIVI's reference selected the sealing rows with a boolean mask
inside the capture, and the failed capture left the process's CUDA RNG unusable for every later
capture. Sealed pages are written, skipped rows (the scratch page, repeated) leave every page as
it was. Plus the detector's own checks: it refuses each kind of waiting op and passes the
capturable forms of the same work."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import make_hf_checkpoint
from host_sync import HostSyncError, NoHostSync

from zipserve.engine.kv_cache import SCRATCH_PAGE
from zipserve.engine.llm import LLM

CODECS = ["fp8", "kivi2", "kivi4", "hack2", "hack4", "hack2mix"]
LOWRANK = ["lowrank", "lowrank+hack2", "lowrank+hack2mix"]
OPTS = dict(device="cpu", dtype="float32", page_size=32, num_pages=16, max_num_seqs=4)


@pytest.fixture(scope="module")
def head96(tmp_path_factory):
    kw = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=96)
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("hd96"), init_std=0.05, seed=96, **kw))


def _store_copy(store) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in store.items()}


def _seal_without_waiting(model: str, codec: str) -> None:
    cache = LLM(model, codec=codec, **OPTS).engine.runner.cache
    layer = 0
    c, store = cache.codecs[layer], cache.stores[layer]
    open_k, open_v = cache.open[layer]  # [slots, KVH, P, D]
    open_k.copy_(torch.randn_like(open_k))
    open_v.copy_(torch.randn_like(open_v))
    before = _store_copy(store)
    # a bucket of 4 rows: two seal pages 3 and 5, two (one a padding row) seal nothing
    seal = torch.tensor([3, SCRATCH_PAGE, 5, SCRATCH_PAGE])
    rows = torch.tensor([0, 1, 2, cache.scratch_slot], dtype=torch.int32)
    with NoHostSync():
        c.seal_rows(store, seal, open_k, open_v, rows, SCRATCH_PAGE)
    for name, t in store.items():
        untouched = [p for p in range(t.shape[0]) if p not in (3, 5)]
        assert torch.equal(t[untouched], before[name][untouched]), name
    assert any(not torch.equal(t[[3, 5]], before[n][[3, 5]]) for n, t in store.items())
    # the pages sealed are those a seal without skipped rows writes
    want = _store_copy(before)
    c.seal_rows(want, torch.tensor([3, 5]), open_k, open_v, rows[[0, 2]], SCRATCH_PAGE)
    for name, t in store.items():
        assert torch.equal(t, want[name]), name


@pytest.mark.parametrize("codec", CODECS[:-1])  # hack2mix needs calibrated bits
def test_seal_waits_for_nothing_at_head_dim_96(head96, codec):
    _seal_without_waiting(head96, codec)


@pytest.mark.parametrize("codec", CODECS + LOWRANK)
def test_seal_waits_for_nothing_at_head_dim_32(codec):
    _seal_without_waiting("random:tiny", codec)


@pytest.mark.parametrize(
    "op",
    [
        lambda x, m: x[m],
        lambda x, m: x.sum().item(),
        lambda x, m: torch.nonzero(m),
        lambda x, m: torch.where(m),
        lambda x, m: x.tolist(),
        lambda x, m: bool(m.any()),
        lambda x, m: x.__setitem__(m, 0.0),
        lambda x, m: torch.unique(x),
    ],
    ids=["mask-select", "item", "nonzero", "where-1-arg", "tolist", "bool", "mask-put", "unique"],
)
def test_detector_refuses_each_waiting_op(op):
    x = torch.randn(6, 3)
    with pytest.raises(HostSyncError), NoHostSync():
        op(x, x[:, 0] > 0)


def test_detector_passes_capturable_forms_and_restores_tolist():
    x, ids = torch.randn(6, 3), torch.tensor([0, 2])
    with NoHostSync():
        keep = x[:, 0] > 0
        y = torch.where(keep[:, None], x, torch.zeros_like(x))
        x[ids] = y[ids]
    assert x.tolist()  # read back as usual after the block
