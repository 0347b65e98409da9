"""Request bodies as JSON, refusing what the rest of the router must never see.

`parse_json_body(body)` returns the parsed value or raises a 400 `OpenAIError`:
- not UTF-8, empty, malformed, or a number too long for Python's int parsing;
- nested deeper than `MAX_JSON_DEPTH` (json.loads alone would raise RecursionError past about a
  thousand levels; the param names the top-level field that nests too deep);
- a string (value or key) with a lone UTF-16 surrogate such as "\\ud800": JSON allows the escape,
  but such a string is not Unicode text (the tokenizer raises TypeError on it and it cannot be
  encoded back into a response); the param names where it is ("messages[0].content").
The checks walk the parsed value iteratively, so they cost one pass and no recursion.
"""

from __future__ import annotations

import json
import re
from typing import Any

from zipserve.router.errors import OpenAIError

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted (an OpenAI request needs about 6)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def parse_json_body(body: bytes) -> Any:
    if not body.strip():
        raise OpenAIError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise OpenAIError(400, "malformed JSON: the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise OpenAIError(
            400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise _too_deep(_deep_field(body)) from None
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit limit
        raise OpenAIError(400, f"malformed JSON: {e}") from None
    check_json_value(data)
    return data


def check_json_value(data: Any) -> None:
    """Raise a 400 for nesting past MAX_JSON_DEPTH or a lone surrogate anywhere in `data`."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep(_param(path[:1]))
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, path, key=True)
                    stack.append((item, path + (key,), depth + 1))
            else:
                stack.extend((item, path + (i,), depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: tuple, key: bool = False) -> None:
    m = _SURROGATE.search(text)
    if m is None:
        return
    param = _param(path)
    where = f"a key of {param}" if key and param else "a key" if key else param
    raise OpenAIError(
        400,
        f"{where or 'the body'}: contains a lone UTF-16 surrogate "
        f"(\\u{ord(m.group()):04x} at character {m.start()}); strings must "
        f"be valid Unicode",
        param=param,
    )


def _too_deep(param: str | None) -> OpenAIError:
    where = f"{param}: nests" if param else "the request body nests"
    return OpenAIError(
        400, f"{where} deeper than {MAX_JSON_DEPTH} levels of arrays and objects", param=param
    )


def _param(path: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _deep_field(body: bytes) -> str | None:
    """The top-level key under which `body` first nests past MAX_JSON_DEPTH (a token scan: the
    body is too deep for json.loads)."""
    depth, key, last = 0, None, None
    for m in _TOKEN.finditer(body):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif tok in (b"]", b"}"):
            depth -= 1
        elif tok == b":":
            if depth == 1 and last is not None:
                try:
                    key = json.loads(last)
                except ValueError:
                    key = None
        last = tok if tok.startswith(b'"') else None
    return key if isinstance(key, str) and not _SURROGATE.search(key) else None
