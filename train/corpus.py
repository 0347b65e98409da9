"""The training corpus: a folder of text files (by default this Python's standard library source),
deduplicated by content, split into training and a fixed held-out evaluation set.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Held-out modules of the standard library (relative paths). Never trained on.
HELD_OUT = (
    "heapq.py",
    "shlex.py",
    "textwrap.py",
    "fractions.py",
    "statistics.py",
    "json/decoder.py",
    "json/encoder.py",
    "colorsys.py",
    "bisect.py",
)
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


@dataclass(frozen=True)
class Document:
    path: str
    """Path relative to the corpus root (posix)."""
    text: str


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: list[Document]
    held_out: list[Document]

    def digest(self, split: str = "held_out") -> str:
        """Short content hash of a split, to tell whether two machines see the same text."""
        h = hashlib.sha256()
        for doc in getattr(self, split):
            h.update(doc.path.encode() + b"\0" + doc.text.encode() + b"\0")
        return h.hexdigest()[:16]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(text_dir: str | Path | None = None) -> Corpus:
    """All text files under text_dir (default: the stdlib, without site-packages), deduplicated.

    Held out: the files named in HELD_OUT when present; for a folder that has none of them,
    every file whose path hash falls in a fixed 2% bucket.
    """
    root = Path(text_dir) if text_dir else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"text_dir: {root} is not a directory")
    seen: set[str] = set()
    docs: list[Document] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            not path.is_file()
            or path.suffix not in TEXT_SUFFIXES
            or "site-packages" in rel
            or "__pycache__" in rel
        ):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not text.strip() or digest in seen:
            continue
        seen.add(digest)
        docs.append(Document(rel, text))
    if not docs:
        raise ValueError(f"text_dir: no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
    names = {d.path for d in docs}
    if names & set(HELD_OUT):
        held = [d for d in docs if d.path in HELD_OUT]
    else:
        held = [d for d in docs if int(hashlib.md5(d.path.encode()).hexdigest(), 16) % 50 == 0]
        held = held or docs[-1:]  # a small folder still gets one held-out file
    if len(held) == len(docs):
        raise ValueError(f"text_dir: {root} holds only held-out files; nothing to train on")
    held_paths = {d.path for d in held}
    return Corpus(root, [d for d in docs if d.path not in held_paths], held)
