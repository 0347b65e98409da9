"""Tokenizers: Hugging Face `tokenizer.json` models and a byte tokenizer for the random models.

`Tokenizer.from_dir(path)` wraps a `tokenizers.Tokenizer` and the optional `tokenizer_config.json`
(special tokens, the Jinja chat template), producing the same ids and text as transformers 5's
`AutoTokenizer`: the tokenizer.json post-processor decides whether BOS is added. `ByteTokenizer` maps bytes to ids 3..258 for `random:` models.
`load_tokenizer(model, skip_tokenizer)` picks one of the two from the model name, or
`NoTokenizer` (engine/no_tokenizer.py: token ids only) when asked to skip the tokenizer.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat: a non-empty list of {role: str, content: str}; errors name the field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}].{key}: missing")
            if not isinstance(m[key], str):
                raise ValueError(
                    f"messages[{i}].{key}: must be a string, got {type(m[key]).__name__}"
                )
        if not m["role"]:
            raise ValueError(f"messages[{i}].role: must not be empty")
    return messages


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: no HTML escaping (Jinja's builtin tojson escapes < > & ').
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile in a sandbox configured as transformers does (trim/lstrip blocks, loop controls)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _eos_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class Tokenizer:
    """A Hugging Face fast tokenizer plus its special tokens and chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos: list[int] = []
        if eos_token and tokenizer.token_to_id(eos_token) is not None:
            eos.append(tokenizer.token_to_id(eos_token))
        eos += [i for i in extra_eos_token_ids if i not in eos]
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        # tokenizer.json's post-processor decides (transformers 5 ignores tokenizer_config's
        # add_bos_token when tokenizer.json exists); this reports what it does.
        self.add_bos_token = self.bos_token_id is not None and tokenizer.encode("").ids[:1] == [
            self.bos_token_id
        ]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            from .no_tokenizer import FLAG

            raise ValueError(
                f"model: no tokenizer.json in {path} (slow/sentencepiece-only "
                f"tokenizers are not supported); to serve it on token ids (prompts "
                f"as lists of ids, no text out) pass {FLAG}"
            )
        tok = HFTokenizer.from_file(str(tok_file))
        cfg = _read_json(root / "tokenizer_config.json")
        special = {
            k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        bos, eos = special["bos_token"], special["eos_token"]

        # As in transformers 5, chat_template.jinja wins over the tokenizer_config.json entry.
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: [{name, template}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")

        extra_eos: list[int] = []
        model_cfgs = [_read_json(root / n) for n in ("config.json", "generation_config.json")]
        for d in model_cfgs:
            extra_eos += _eos_list(d.get("eos_token_id"))
        out = cls(
            tok,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=tuple(extra_eos),
            chat_template=template,
            special_tokens=special,
        )
        if out.bos_token_id is None and isinstance(model_cfgs[0].get("bos_token_id"), int):
            out.bos_token_id = model_cfgs[0]["bos_token_id"]
        return out

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise ValueError(
                "messages: this model's tokenizer has no chat_template; send a plain prompt instead"
            )
        validate_messages(messages)
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"messages: chat template rejected the conversation: {e}") from e


class ByteTokenizer:
    """Bytes as tokens for the random models: id = byte + 3; 0 pad, 1 bos, 2 eos."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    # What apply_chat_template renders (in plain Python), written as the equivalent Jinja.
    chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )

    def __init__(self, vocab_size: int = 512):
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(
                f"vocab_size: a byte tokenizer needs at least 259 ids, got {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS
        self.eos_token_ids: tuple[int, ...] = (self.EOS,)
        self.bos_token, self.eos_token = "<s>", "</s>"
        self.add_bos_token = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: must be a string, got {type(text).__name__}")
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        validate_messages(messages)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def load_tokenizer(model: str | Path, skip_tokenizer: bool = False):
    """`random:<name>` -> ByteTokenizer sized to that model; a directory -> Tokenizer.from_dir;
    skip_tokenizer -> NoTokenizer (token ids only) for either."""
    if skip_tokenizer:
        from .no_tokenizer import NoTokenizer

        return NoTokenizer.for_model(model)
    if isinstance(model, str) and model.startswith("random:"):
        from .config import random_model_config

        return ByteTokenizer(random_model_config(model).vocab_size)
    return Tokenizer.from_dir(model)
