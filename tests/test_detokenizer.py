"""Incremental detokenization and stop strings, on a byte-level BPE trained on the fly."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zipserve.engine.detokenizer import Detokenizer, check_stop, stop_prefix_len

CORPUS = [
    "héllo wörld, héllo again wörld!",
    "日本語のテキストです。日本語 is Japanese.",
    "emoji time 🙂🙂 and 🚀 go, café naïve façade",
    "the quick brown fox jumps over the lazy dog 12345",
    "Ünïcödé strings: ß, æ, ø, å, ñ, 中文, 한국어, Ελληνικά",
    "STOP here ### and <end> there; END of text",
]
ALPHABET = list("abc xyz.,!#<>") + list("éöü日本語🙂🚀ß中한Ω\n")


class StopBuffer:
    """Output text of one sequence under stop strings, with a safe-to-stream cursor: the
    streaming contract check_stop and stop_prefix_len serve, written out for these tests (the
    engine and the decode worker use the two functions directly)."""

    def __init__(self, stop_strings: Sequence[str] = ()) -> None:
        self.stop_strings = tuple(stop_strings)
        self._text = ""
        self._streamed = 0  # len of the prefix of _text already returned by stream_delta
        self.stop_string: str | None = None
        """The stop string that ended the sequence, if any."""
        self.finished = False

    @property
    def text(self) -> str:
        """Output text so far; after a stop match, everything before the stop string."""
        return self._text

    def append(self, delta: str, check: bool = True) -> str | None:
        """Add newly decoded text; return the stop string if one now matched (then finished).

        check=False appends without matching (e.g. before min_tokens is reached).
        """
        if self.finished:
            raise RuntimeError("StopBuffer: append after the sequence finished")
        self._text += delta
        if not check:
            return None
        matched, at = check_stop(self._text, len(delta), self.stop_strings)
        if matched is not None:
            assert at is not None and at >= self._streamed, "streamed text was cut away"
            self._text = self._text[:at]
            self.stop_string = matched
            self.finished = True
        return matched

    def finish(self) -> None:
        """The sequence ended for another reason (EOS, length): release everything held back."""
        self.finished = True

    def stream_delta(self) -> str:
        """New text that no later stop match can cut away (all of it once finished)."""
        end = len(self._text)
        if not self.finished:
            end -= stop_prefix_len(self._text, self.stop_strings)
        if end <= self._streamed:
            return ""
        out = self._text[self._streamed : end]
        self._streamed = end
        return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    t.train_from_iterator(CORPUS * 3, trainer)
    return t


def _decoder(tok: Tokenizer):
    return lambda ids: tok.decode(ids)


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_partial_utf8_is_held_back(tok):
    ids = tok.encode("🚀").ids
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    d = Detokenizer(_decoder(tok), tok.encode("hi ").ids)
    deltas = [d.add_token(t) for t in ids]
    assert all(x == "" for x in deltas[:-1]) and deltas[-1] == "🚀" and d.text == "🚀"


@pytest.mark.parametrize("seed", range(8))
def test_incremental_equals_full_decode(tok, seed):
    rng = random.Random(seed)
    prompt = tok.encode(_random_text(rng, rng.randint(0, 12))).ids
    out = tok.encode(_random_text(rng, 60)).ids
    d = Detokenizer(_decoder(tok), prompt)
    deltas = []
    for t in out:
        delta = d.add_token(t)
        assert "\ufffd" not in delta
        deltas.append(delta)
    deltas.append(d.flush())
    assert "".join(deltas) == tok.decode(out) == d.text
    assert d.output_ids == out


def test_flush_releases_incomplete_tail(tok):
    ids = tok.encode("ab🎉").ids[:-1]  # cut inside the emoji (not in the corpus: several tokens)
    d = Detokenizer(_decoder(tok))
    text = "".join(d.add_token(t) for t in ids)
    assert not text.endswith("\ufffd")
    text += d.flush()
    assert text == tok.decode(ids) and text.endswith("\ufffd")


def test_decode_window_is_small(tok):
    calls: list[int] = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    d = Detokenizer(decode, tok.encode("x" * 50).ids)
    for t in tok.encode("abc " * 200).ids:
        d.add_token(t)
    assert max(calls) <= 8


def test_check_stop_function():
    assert check_stop("hello world", 5, ["wor"]) == ("wor", 6)
    assert check_stop("hello world", 4, ["o"]) == ("o", 7)  # match must overlap the delta
    assert check_stop("hello world", 3, ["o"]) == (None, None)
    assert check_stop("hello world", 2, ["o w"]) == (None, None)  # only in old text
    assert check_stop("abcSTOPdef", 3, ["STOP", "def"]) == ("def", 7)
    assert check_stop("abXYcd", 3, ["XYc", "Yc"]) == ("XYc", 2)  # earliest start wins
    assert check_stop("abc", 0, ["c"]) == (None, None)
    assert check_stop("abc", 1, []) == (None, None)


def _run(tok, prompt: str, output: str, stops, min_check=0):
    """Feed `output` token by token through Detokenizer + StopBuffer; return what came out."""
    d = Detokenizer(_decoder(tok), tok.encode(prompt).ids)
    buf = StopBuffer(stops)
    streamed = ""
    for n, t in enumerate(tok.encode(output).ids, 1):
        buf.append(d.add_token(t), check=n > min_check)
        streamed += buf.stream_delta()
        assert buf.text.startswith(streamed)
        if buf.finished:
            break
    else:
        buf.append(d.flush())
        buf.finish()
    streamed += buf.stream_delta()
    return buf, streamed


def test_stop_string_truncates_before_it(tok):
    buf, streamed = _run(tok, "Q:", "the answer ### more text", ["###"])
    assert buf.text == "the answer " == streamed and buf.stop_string == "###"


def test_stop_string_spanning_tokens_and_multibyte(tok):
    out = "héllo wörld 日本語 then 🙂🚀 tail"
    stop = "語 then 🙂"
    ids = tok.encode(out).ids
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces), "stop must span several tokens"
    buf, streamed = _run(tok, "", out, [stop, "never"])
    assert buf.text == "héllo wörld 日本" == streamed and buf.stop_string == stop


def test_no_stop_streams_everything(tok):
    buf, streamed = _run(tok, "", "abc ##x <en d> done", ["###", "<end>"])
    assert buf.stop_string is None and buf.text == streamed == "abc ##x <en d> done"


def test_stop_before_min_tokens_is_ignored(tok):
    out = "## then ### after"
    n_first = len(tok.encode("## then ###").ids)
    buf, streamed = _run(tok, "", out, ["###"], min_check=n_first + 5)
    assert buf.stop_string is None and streamed == out


@pytest.mark.parametrize("seed", range(30))
def test_streamed_equals_final_truncated_text(tok, seed):
    rng = random.Random(1000 + seed)
    output = _random_text(rng, 80)
    while True:
        stops = [_random_text(rng, rng.randint(1, 3)) for _ in range(2)]
        if rng.random() < 0.5:  # make a match likely, somewhere mid-text
            at = rng.randint(0, len(output) - 3)
            stops.append(output[at : at + rng.randint(1, 3)])
        # Reference: cut before the earliest occurrence of any stop string in the whole output.
        # When another stop string would complete first (e.g. "b" inside "abc"), which one wins
        # depends on how the text is split into deltas: draw again.
        hits = sorted((output.find(s), s) for s in stops if s in output)
        if not hits or all(hits[0][0] + len(hits[0][1]) <= at + len(s) for at, s in hits):
            break
    buf, streamed = _run(tok, "p", output, stops)
    ref = output[: hits[0][0]] if hits else output
    assert buf.text == ref == streamed, (stops, buf.text, ref)
    assert (buf.stop_string is not None) == bool(hits)


def test_append_after_finish_raises():
    buf = StopBuffer(["x"])
    assert buf.append("abx") == "x" and buf.text == "ab"
    with pytest.raises(RuntimeError):
        buf.append("more")
