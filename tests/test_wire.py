"""Wire form of encoded pages: a round trip adopts identical pages; corruption is refused."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codecs import CODECS, make_codec
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.compress.wire import WireError, adopt_pages, pack_pages, unpack_pages


def _filled(codec_name: str):
    c = make_codec(codec_name, num_kv_heads=2, page_size=64, head_dim=64,
                   model_dir=str(REFERENCE_MODEL)).for_layer(0)
    store = c.new_store(6, "cpu")
    g = torch.Generator().manual_seed(1)
    c.encode(store, torch.tensor([1, 2, 4]), torch.randn(3, 2, 64, 64, generator=g),
             torch.randn(3, 2, 64, 64, generator=g))
    return c, store


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "bf16"])
def test_round_trip_into_other_page_ids(codec):
    c, src = _filled(codec)
    buf = pack_pages(codec, src, torch.tensor([4, 1, 2]), meta={"request": "r1"})
    dst = c.new_store(8, "cpu")
    got = unpack_pages(buf)
    assert got.meta == {"request": "r1"} and got.num_pages == 3
    adopt_pages(codec, dst, torch.tensor([7, 0, 3]), got)
    for name in src:
        assert torch.equal(dst[name][[7, 0, 3]].view(torch.uint8),
                           src[name][[4, 1, 2]].view(torch.uint8))
    # the payload is exactly the stated bytes of 3 pages
    payload = sum(t[[4, 1, 2]].numel() * t.element_size() for t in src.values())
    assert payload == pytest.approx(3 * 2 * 64 * c.page_bytes_per_token())


def test_corruption_and_mismatch_are_refused():
    c, src = _filled("hack2")
    buf = bytearray(pack_pages("hack2", src, torch.tensor([1, 2])))
    buf[-5] ^= 0xFF
    with pytest.raises(WireError, match="checksum"):
        unpack_pages(bytes(buf))
    with pytest.raises(WireError, match="magic"):
        unpack_pages(b"garbage" * 3)
    good = unpack_pages(pack_pages("hack2", src, torch.tensor([1, 2])))
    with pytest.raises(WireError, match="hack4"):
        adopt_pages("hack4", c.new_store(4, "cpu"), torch.tensor([0, 1]), good)
    with pytest.raises(WireError, match="reserved"):
        adopt_pages("hack2", c.new_store(4, "cpu"), torch.tensor([0]), good)
