"""kernels/step_constants.py: cached row ids / zeros are right, grow on demand, and are never
cached while a CUDA graph captures."""

import pytest
import torch

from zipserve.kernels import step_constants as sc


def test_row_ids_and_zeros_are_right_and_shared():
    sc._CACHE.clear()
    for m in (0, 1, 5, 64, 65, 300, 7):
        ids, zeros = sc.row_ids(m, "cpu"), sc.zero_ids(m, "cpu")
        assert ids.dtype == zeros.dtype == torch.int32
        assert torch.equal(ids, torch.arange(m, dtype=torch.int32))
        assert torch.equal(zeros, torch.zeros(m, dtype=torch.int32))
    a, b = sc.row_ids(10, "cpu"), sc.row_ids(20, "cpu")
    assert a.data_ptr() == b.data_ptr()  # one cached tensor serves both: no new allocation
    with pytest.raises(ValueError, match="m must be"):
        sc.row_ids(-1, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nothing_is_cached_during_capture():
    sc._CACHE.clear()
    dev = torch.device("cuda", torch.cuda.current_device())
    graph, out = torch.cuda.CUDAGraph(), torch.zeros(100, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(sc.row_ids(100, dev))
    assert not sc._CACHE  # a capture's memory holds nothing until replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.arange(100, dtype=torch.int32, device=dev))
    assert torch.equal(sc.zero_ids(100, dev), torch.zeros(100, dtype=torch.int32, device=dev))
    assert (("zeros", dev)) in sc._CACHE
