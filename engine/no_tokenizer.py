"""What an engine runs with when it has no tokenizer (`skip_tokenizer`, vLLM's skip_tokenizer_init).

Token ids in, token ids out: `encode` and `apply_chat_template` refuse with a ValueError naming the
field (`prompt`, `messages`), `decode` gives "" (outputs carry token ids and empty text), and
`token_string` names a token as vLLM does without a tokenizer ("token_id:42", for logprobs). EOS
ids come from the checkpoint's config.json and generation_config.json, as with a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLAG = "skip_tokenizer=True (`zipserve serve --skip-tokenizer`)"
"""How to ask for a tokenizer-less engine, as error messages name it."""


def _eos_ids(model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return tuple(ids)


class NoTokenizer:
    """Stands in for a tokenizer: the engine's prompts must be token ids."""

    chat_template = None
    bos_token = eos_token = None
    add_bos_token = False

    def __init__(self, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None):
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id

    @classmethod
    def for_model(cls, model: str | Path) -> NoTokenizer:
        """EOS ids of a checkpoint directory (none for a `random:` model, whose config's own
        eos_token_ids the engine adds anyway)."""
        if isinstance(model, str) and model.startswith("random:"):
            return cls()
        return cls(_eos_ids(Path(model)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError(
            f"prompt: this model runs without a tokenizer ({FLAG}); send the prompt "
            f"as a list of token ids"
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    @staticmethod
    def token_string(token_id: int) -> str:
        """A token's name where its text is unknown (vLLM's form)."""
        return f"token_id:{token_id}"

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        raise ValueError(
            f"messages: this model runs without a tokenizer ({FLAG}); chat needs "
            f"one: send /v1/completions a prompt of token ids"
        )
