"""Checkpoint loading and tokenizers against transformers on tiny random Llama/Mistral/Qwen2 models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import LLAMA3_ROPE, load_hf_model, make_hf_checkpoint, write_tokenizer
from safetensors.torch import load_file, save_file

from zipserve.engine.checkpoint import CheckpointError, load_checkpoint
from zipserve.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

L, M, Q = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

# (arch, config overrides, tied, storage dtype, sharded): every arch tied and untied, sharded and
# not; every storage dtype for several archs.
CASES = [
    (L, {}, False, F32, False),
    (L, {}, True, BF16, True),
    (L, {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}, False, F16, True),
    (L, {"rope_scaling": LLAMA3_ROPE, "num_hidden_layers": 3}, True, F32, False),
    (M, {}, False, BF16, False),
    (M, {"num_hidden_layers": 3}, True, F16, True),
    (Q, {}, False, F32, True),
    (Q, {}, True, BF16, False),
    (Q, {}, False, F16, False),
]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """Untied fp32 single-file Llama checkpoint; tests copy it before editing."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize("arch,overrides,tied,dtype,sharded", CASES)
def test_load_matches_transformers(tmp_path, arch, overrides, tied, dtype, sharded):
    path = make_hf_checkpoint(
        tmp_path, arch, tie_word_embeddings=tied, dtype=dtype, sharded=sharded, seed=3, **overrides
    )
    assert (path / "model.safetensors.index.json").is_file() == sharded
    config, tensors = load_checkpoint(path)
    assert config.architecture == arch and config.tie_word_embeddings == tied
    assert config.num_layers == overrides.get("num_hidden_layers", 2)
    assert (config.rope_scaling is not None) == ("rope_scaling" in overrides)
    assert config.rope_theta == overrides.get("rope_theta", 10000.0)
    expected = config.expected_tensor_shapes()
    assert set(tensors) == set(expected)
    assert ("lm_head.weight" in tensors) == (not tied)

    reference = load_hf_model(path).state_dict()
    for name, t in tensors.items():
        assert tuple(t.shape) == expected[name], name
        assert t.dtype == dtype and t.device.type == "cpu", name
        # bf16/fp16 -> fp32 is exact, so the fp32 reference holds the stored values bit for bit.
        assert torch.equal(t.float(), reference[name]), name
    if arch == Q:
        assert config.attention_bias
        assert tensors["model.layers.0.self_attn.k_proj.bias"].abs().min() > 0
    if tied:
        assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


def test_dtype_conversion(ckpt, tmp_path):
    _, ref = load_checkpoint(ckpt)
    _, half = load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], ref[k].to(torch.bfloat16)) for k in ref)
    bf = make_hf_checkpoint(tmp_path / "bf", dtype=torch.bfloat16)
    _, wide = load_checkpoint(bf, dtype="float32")
    assert all(t.dtype == torch.float32 for t in wide.values())
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(ckpt, dtype=torch.int8)


def test_shards_without_index(tmp_path):
    path = make_hf_checkpoint(tmp_path, Q, sharded=True)
    _, with_index = load_checkpoint(path)
    (path / "model.safetensors.index.json").unlink()
    assert len(list(path.glob("*.safetensors"))) > 1
    _, without = load_checkpoint(path)
    assert set(with_index) == set(without)
    assert all(torch.equal(with_index[k], without[k]) for k in without)


def test_missing_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(ckpt, lambda t: t.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(ValueError) as e:
        load_checkpoint(ckpt)
    assert str(e.value) == (
        f"{name}: shape (64, 64) in checkpoint, expected (32, 64) from config.json"
    )


def test_unexpected_and_harmless_extras(ckpt):
    inv = torch.ones(8)
    _edit_weights(
        ckpt,
        lambda t: t.update(
            {
                "model.rotary_emb.inv_freq": inv,
                "model.layers.0.self_attn.rotary_emb.inv_freq": inv + 1,
            }
        ),
    )
    _, tensors = load_checkpoint(ckpt)
    assert not any("inv_freq" in k for k in tensors)
    _edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": inv}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_checkpoint(ckpt)


def test_tied_embeddings_rules(ckpt):
    _edit_config(ckpt, tie_word_embeddings=True)  # lm_head.weight present but tied: ignored
    config, tensors = load_checkpoint(ckpt)
    assert config.tie_word_embeddings and "lm_head.weight" not in tensors
    _edit_config(ckpt, tie_word_embeddings=False)
    _edit_weights(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*tie_word_embeddings"):
        load_checkpoint(ckpt)


def test_quantized_storage_refused(ckpt):
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_weights(ckpt, lambda t: t.__setitem__(name, t[name].to(torch.int8)))
    with pytest.raises(CheckpointError, match=rf"{name}: stored as I8"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ],
)
def test_config_errors(ckpt, changes, field):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=field):
        load_checkpoint(ckpt)


def test_no_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*\.bin/pickle"):
        load_checkpoint(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_checkpoint(ckpt)


def test_missing_shard(tmp_path):
    path = make_hf_checkpoint(tmp_path, sharded=True)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


# ---------------------------------------------------------------- tokenizers

TEXTS = ["def f(x):\n    return x * 2", "héllo wörld 🙂  two  spaces ", "", "<s> and </s> inline"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi ünï <s>"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "def f(): pass"},
]


def test_tokenizer_matches_transformers(base_ckpt):
    from transformers import AutoTokenizer

    hf, tok = AutoTokenizer.from_pretrained(base_ckpt), Tokenizer.from_dir(base_ckpt)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert tok.encode(text) == ids and ids[0] == tok.bos_token_id == 1
        assert (
            tok.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False)["input_ids"]
        )
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert tok.vocab_size == len(hf) == 320
    assert tok.eos_token_ids == (2,)
    for gen in (True, False):
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == hf.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=gen
        )


def test_post_processor_decides_bos(base_ckpt, tmp_path):
    """transformers 5 ignores tokenizer_config's add_bos_token when tokenizer.json exists."""
    from transformers import AutoTokenizer

    path = Path(shutil.copytree(base_ckpt, tmp_path / "m"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    hf, tok = AutoTokenizer.from_pretrained(path), Tokenizer.from_dir(path)
    assert tok.encode(TEXTS[0]) == hf(TEXTS[0])["input_ids"]
    assert tok.encode(TEXTS[0])[0] == 1 and tok.add_bos_token
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert (
        Tokenizer.from_dir(path).apply_chat_template(CHAT)
        == AutoTokenizer.from_pretrained(path).apply_chat_template(CHAT, tokenize=False)
        == "Be brief.!"
    )


def test_chat_template_edge_cases(tmp_path):
    write_tokenizer(tmp_path, 320, chat_template=None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (2, 7) and tok.add_bos_token
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(CHAT)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    write_tokenizer(tmp_path, 320, chat_template=strict + "{{ bos_token }}x")
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="user first"):
        tok.apply_chat_template(CHAT)
    assert tok.apply_chat_template(CHAT[1:2]) == "<s>x"


@pytest.mark.parametrize(
    "messages,field",
    [
        ("hello", "messages"),
        ([], "messages"),
        ([CHAT[0], "hi"], r"messages\[1\]"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([CHAT[0], {"role": "user", "content": 5}], r"messages\[1\]\.content"),
        ([{"role": None, "content": "x"}], r"messages\[0\]\.role"),
    ],
)
def test_bad_messages(base_ckpt, messages, field):
    for tok in (Tokenizer.from_dir(base_ckpt), ByteTokenizer()):
        with pytest.raises(ValueError, match=field):
            tok.apply_chat_template(messages)


def test_byte_tokenizer():
    tok = load_tokenizer("random:tiny")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 512
    text = "naïve café — 日本語 🙂\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and all(3 <= i <= 258 for i in ids[1:])
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([1, 0, 2] + tok.encode("ok", add_special_tokens=False) + [400]) == "ok"
    assert tok.decode([0xE6 + 3]) == "\ufffd"  # truncated UTF-8 sequence
    assert tok.eos_token_ids == (2,)
    assert tok.apply_chat_template(CHAT[:2]) == "system: Be brief.\nuser: hi ünï <s>\nassistant: "
    assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=False) == "system: Be brief.\n"
    with pytest.raises(ValueError, match="random:tiny"):
        load_tokenizer("random:nope")


def test_load_tokenizer_dir(base_ckpt):
    assert isinstance(load_tokenizer(str(base_ckpt)), Tokenizer)
