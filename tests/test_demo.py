"""The demo's pieces: prompts of several KV pages of real source, a link scaled to the model, and a
table whose byte ratios are against what the bf16 codec sent for the same prompt."""

from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.demo import DemoRow, demo_prompts, print_table, scaled_link_gbps
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


def test_link_is_scaled_by_kv_bytes_per_token():
    cfg = ModelConfig.from_dir(REFERENCE_MODEL)
    llama_bytes = 32 * 2 * 8 * 128 * 2  # Llama-3-8B: layers x (K, V) x KV heads x head_dim x bf16
    want = 10.0 * cfg.kv_bytes_per_token(2) / llama_bytes
    assert abs(scaled_link_gbps(str(REFERENCE_MODEL)) - want) < 1e-9
    assert abs(scaled_link_gbps("random:llama3-8b") - 10.0) < 1e-9


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
