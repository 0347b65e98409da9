"""The demo's pieces: prompts of several KV pages of real source, a link calibrated to weigh in a
job as Llama-3-8B's 10 Gb/s link does on an H100, and a table whose byte ratios are against what
the bf16 codec sent for the same prompt."""

import pytest

from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.demo import (
    WIRE_TO_PREFILL,
    DemoRow,
    calibrated_link_gbps,
    demo_prompts,
    print_table,
)
from zipserve.engine.config import ModelConfig
from zipserve.engine.tokenizer import load_tokenizer


def test_demo_prompts_are_several_pages_of_real_source():
    tok = load_tokenizer(str(REFERENCE_MODEL))
    prompts = demo_prompts()
    assert len(prompts) == 4 and len(set(prompts)) == 4
    for p in prompts:
        assert p.startswith(("def ", "class ")) and p.endswith("\n")
        compile(p.split("\n", 1)[0] + "\n    pass\n", "<demo>", "exec")  # a real header line
        assert len(tok.encode(p)) >= 8 * 64  # at least 8 KV pages


def test_calibrated_link_puts_the_h100_wire_to_prefill_ratio_on_this_machine():
    llama_bytes = 32 * 2 * 8 * 128 * 2  # Llama-3-8B: layers x (K, V) x KV heads x head_dim x bf16
    # on an H100 at 10 Gb/s 8k tokens take 0.859 s on the wire and 0.289 s to prefill
    assert WIRE_TO_PREFILL == pytest.approx(8192 * llama_bytes * 8 / 10e9 / 0.289)
    assert 2.9 < WIRE_TO_PREFILL < 3.0
    # 6144 B/token prefilled at 0.3 ms/token: 0.9 ms/token on the wire, 6144 * 8 / 0.9e-3 b/s
    assert calibrated_link_gbps(6144, 3e-4, 3.0) == pytest.approx(6144 * 8 / 0.9e-3 / 1e9)
    with pytest.raises(ValueError):
        calibrated_link_gbps(6144, 0.0)


def test_llama_equivalent_link_counts_the_bytes_the_engine_sends(monkeypatch):
    import zipserve.deploy.demo as demo

    cfg = ModelConfig.from_dir(REFERENCE_MODEL)
    llama_bytes = 32 * 2 * 8 * 128 * 2
    for size in (2, 4):  # bf16 on a GPU, fp32 on the CPU: twice the bytes, half the link
        monkeypatch.setattr(demo, "dense_element_size", lambda size=size: size)
        want = 1.0 * llama_bytes / cfg.kv_bytes_per_token(size)
        assert demo.llama_equivalent_gbps(str(REFERENCE_MODEL), 1.0) == pytest.approx(want)
    assert demo.llama_equivalent_gbps("random:llama3-8b", 10.0) == pytest.approx(10.0 * 2 / size)


def _job(sent, jct):
    return {
        "ttft": 0.01,
        "jct": jct,
        "kv_bytes": sent,
        "prompt_tokens": 900,
        "completion_tokens": 32,
        "phases": [{"name": "transfer", "duration": 0.002}],
    }


def test_table_ratios_are_against_the_bf16_codec_for_the_same_prompt(capsys):
    rows = [
        DemoRow("bf16", "a", _job(4000, 0.4)),
        DemoRow("bf16", "b", _job(8000, 0.6)),
        DemoRow("hack2", "a", _job(500, 0.2)),
        DemoRow("hack2", "b", _job(2000, 0.3)),
    ]
    print_table(rows)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| hack2")]
    assert lines[0].endswith("| 0.12x |") and lines[1].endswith("| 0.25x |")
    assert "mean JCT vs bf16: bf16 1.00x, hack2 0.50x" in out


def test_table_says_which_tokens_the_decode_cache_held(capsys):
    cached = {**_job(0, 0.2), "kv_cached_tokens": 896, "local_prefill": True}
    rows = [DemoRow("bf16", "a", _job(4000, 0.4)), DemoRow("hack2", "a", cached)]
    print_table(rows)
    out = capsys.readouterr().out
    assert "| - | 3.9 KiB | 1.00x |" in out  # bf16's record has no cache field: nothing claimed
    assert "| 896 (local) | 0.0 KiB | 0.00x |" in out
    assert "held by decode" in out and "did not cross the link" in out


def test_calibration_times_one_prefill_and_sets_the_link(monkeypatch):
    import zipserve.deploy.demo as demo

    job = {"prompt_tokens": 1000, "phases": [{"name": "prefill", "duration": 0.3}]}
    monkeypatch.setattr(demo, "post_json", lambda url, body, timeout: {"id": "j1"})
    monkeypatch.setattr(demo, "get_json", lambda url: job if url.endswith("/j1") else {})
    monkeypatch.setattr(demo, "dense_element_size", lambda: 4)

    class Backend:
        link = None

        def set_link(self, gbps):
            self.link = gbps

    b = Backend()
    link = demo._calibrate(str(REFERENCE_MODEL), "u", "http://x", b, 8)
    dense = ModelConfig.from_dir(REFERENCE_MODEL).kv_bytes_per_token(4)
    assert b.link == link == pytest.approx(calibrated_link_gbps(dense, 0.3e-3))
    job["phases"] = []  # a record without the prefill: said, not guessed
    with pytest.raises(RuntimeError, match="no prefill time"):
        demo._calibrate(str(REFERENCE_MODEL), "u", "http://x", b, 8)
