"""The KV wire (compress/wire/): a round trip of encoded pages adopts identical pages, every
format is read by one decode dispatching on its magic, and what is wrong comes back typed."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codecs import CODECS, make_codec
from zipserve.compress.wire import (
    DEVICE_HEADER,
    ChecksumError,
    DeviceHeader,
    DeviceLayerKV,
    FormatError,
    LayerKV,
    LayoutError,
    SliceKV,
    SliceMessage,
    WireError,
    WirePages,
    adopt_pages,
    decode,
    pack_device,
    pack_pages,
    slice_to_bytes,
    unpack_pages,
    verify_checksum,
)
from zipserve.deploy.cli import REFERENCE_MODEL


def _filled(codec_name: str):
    c = make_codec(
        codec_name, num_kv_heads=2, page_size=64, head_dim=64, model_dir=str(REFERENCE_MODEL)
    ).for_layer(0)
    store = c.new_store(6, "cpu")
    g = torch.Generator().manual_seed(1)
    c.encode(
        store,
        torch.tensor([1, 2, 4]),
        torch.randn(3, 2, 64, 64, generator=g),
        torch.randn(3, 2, 64, 64, generator=g),
    )
    return c, store


@pytest.mark.parametrize("codec", CODECS)  # bf16 too: its pages are the dense codec's store
def test_round_trip_into_other_page_ids(codec):
    c, src = _filled(codec)
    buf = pack_pages(codec, src, torch.tensor([4, 1, 2]), meta={"request": "r1"})
    dst = c.new_store(8, "cpu")
    got = unpack_pages(buf)
    assert got.meta == {"request": "r1"} and got.num_pages == 3
    adopt_pages(codec, dst, torch.tensor([7, 0, 3]), got)
    for name in src:
        assert torch.equal(
            dst[name][[7, 0, 3]].view(torch.uint8), src[name][[4, 1, 2]].view(torch.uint8)
        )
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


def test_errors_are_typed():
    c, src = _filled("hack2")
    buf = bytearray(pack_pages("hack2", src, torch.tensor([1, 2])))
    buf[-5] ^= 0xFF
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        unpack_pages(bytes(buf))
    with pytest.raises(FormatError):
        unpack_pages(bytes(buf[:-1]))  # a byte short
    good = unpack_pages(pack_pages("hack2", src, torch.tensor([1, 2])))
    with pytest.raises(LayoutError):
        adopt_pages("hack4", c.new_store(4, "cpu"), torch.tensor([0, 1]), good)
    wire = pack_device("hack2", src, torch.tensor([1, 2]))
    header = wire.finalize()
    wire.payload[3] ^= 1
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        verify_checksum(header, wire.payload)
    assert all(
        issubclass(e, WireError) and issubclass(e, ValueError)
        for e in (ChecksumError, FormatError, LayoutError)
    )


def test_one_decode_reads_every_format():
    c, src = _filled("hack2")
    pages = pack_pages("hack2", src, torch.tensor([1, 2]))
    tail = {"open_k": torch.randn(2, 5, 64).half(), "open_v": torch.randn(2, 5, 64).half()}
    layer = LayerKV(3, 133, pages, tail, "r7")
    device = DeviceLayerKV(3, 133, pack_device("hack2", src, torch.tensor([1, 2]), tail), "r7")
    part = SliceKV(3, 1, 128, 5, 133, "hack2", pages, tail)

    got = decode(pages)
    assert isinstance(got, WirePages) and got.codec == "hack2" and got.num_pages == 2
    got = decode(layer.to_bytes())
    assert isinstance(got, LayerKV) and (got.layer, got.num_tokens, got.request_id) == (
        3,
        133,
        "r7",
    )
    assert got.pages == pages and all(torch.equal(got.tail[k], tail[k]) for k in tail)
    got = decode(device.header_bytes())
    assert isinstance(got, DeviceHeader) and got.wire["codec"] == "hack2" and got.layer == 3
    got = decode(slice_to_bytes(part, "r7", 4))
    assert isinstance(got, SliceMessage) and (got.request_id, got.n_ranks) == ("r7", 4)
    assert (got.kv.rank, got.kv.start, got.kv.pages) == (1, 128, pages)

    for bad in (
        b"",
        b"garbage",
        b"ZKVQ\x01" + bytes(8),
        DEVICE_HEADER + b"\xff\xff\x00\x00{}",
        layer.to_bytes()[:-7],
    ):
        with pytest.raises(FormatError):
            decode(bad)


def test_first_page_of_a_delta_travels_in_both_forms():
    """A delta's first_page survives the host bytes and the device header; headers without it
    (senders from before delta transfers) read as 0; a negative or non-integer one is refused."""
    import json

    from zipserve.compress.wire import frame, unframe
    from zipserve.compress.wire.framing import LAYER

    c, src = _filled("hack2")
    pages = pack_pages("hack2", src, torch.tensor([2, 4]))
    host = LayerKV(0, 300, pages, {}, "r", first_page=2)
    assert decode(host.to_bytes()).first_page == 2
    dev = DeviceLayerKV(0, 300, pack_device("hack2", src, torch.tensor([2, 4])), "r", first_page=2)
    got = DeviceLayerKV.from_header(dev.header_bytes(), dev.wire.payload)
    assert got.first_page == 2 and got.verify()
    f = unframe(host.to_bytes(), LAYER)
    for value, ok in ((None, 0), (-1, None), ("2", None), (True, None)):
        header = {k: v for k, v in f.header.items() if k != "first_page"}
        if value is not None:
            header["first_page"] = value
        data = frame(LAYER, header, bytes(f.body))
        if ok is None:
            with pytest.raises(FormatError, match="first_page"):
                LayerKV.from_bytes(data)
        else:
            assert LayerKV.from_bytes(data).first_page == ok
    assert json.loads(json.dumps(f.header))["first_page"] == 2


def test_the_decode_worker_counts_checksum_failures_by_type():
    from zipserve.decode_worker.worker import failure_reason

    assert failure_reason(ChecksumError("anything")) == "checksum_mismatch"
    assert failure_reason(ValueError("checksum mismatch in the text only")) == "kv_rejected"
    assert (
        failure_reason(LayoutError("pages are 'hack2', this pool holds 'hack4'")) == "kv_rejected"
    )
