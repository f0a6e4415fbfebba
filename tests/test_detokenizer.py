"""Incremental detokenization and stop strings, with real `tokenizers` models trained here from
stdlib text (no download): a byte-level BPE (GPT-2 / SmolLM style) and Metaspace tokenizers
(sentencepiece / Llama style), fed one id at a time like the engine does."""

from __future__ import annotations

import random
from pydoc_data.topics import topics

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgert.text.detokenizer import IncrementalDetokenizer
from edgert.text.stop_strings import StopStringMatcher

FFFD = "\ufffd"
# The tokenizer fixtures are module-scoped and read-only, so reusing them across examples is safe.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
         "on", "not", "this", "are", "or", "from", "at", "which", "function", "class", "return",
         "value", "object", "name", "type", "module", "import", "python", "☃", "😀", "中文"]

EXTRA = [
    "Emoji: 😀😃😄 👩‍👩‍👧 🇫🇷🇯🇵 🚀🚀 🧪⚗️ 👍🏽",
    "中文：你好，世界！今天天气很好。我们一起学习分词器。",
    "日本語: こんにちは、世界。カタカナとひらがな。",
    "한국어: 안녕하세요 세계",
    "Accents: café naïve façade résumé Ångström São Paulo Zürich",
    "Math: ∑ ∫ √ ∞ ≤ ≥ ≠ → ⇒ ∀x ∃y",
]

SAMPLES = [
    "Hello, world! 😀 Ça va? 中文测试。",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "emoji run 🚀🚀🚀👩‍👩‍👧🇫🇷 done",
    "naïve café → résumé ≠ resume",
    "こんにちは世界 and 한국어 mixed with English words",
    "def f(x):\n    return x ** 2  # squares",
    "rare chars: ⚗︎ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧬 ꙮ",
]


def tid(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    assert i is not None, token
    return i


def corpus() -> list[str]:
    docs = [topics[k] for k in sorted(topics)[:40]]
    return docs + EXTRA * 20


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(corpus(), trainer)
    return tok


def metaspace(prepend_scheme: str, llama_decoder: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    if llama_decoder:  # what Llama / Mistral tokenizer.json files carry
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def sp_tokenizers() -> list[Tokenizer]:
    return [metaspace("always", False), metaspace("first", True)]


def stream(tok: Tokenizer, prompt: list[int], out: list[int], chunks: list[int] | None = None,
           skip: bool = True) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `out` in pieces of the given sizes (one id at a time by default)."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces, i = [], 0
    sizes = chunks or [1] * len(out)
    for n in sizes:
        pieces.append(d.add(out[i : i + n]))
        i += n
    pieces.append(d.add(out[i:]))
    pieces.append(d.flush())
    return pieces, d


# ------------------------------------------------------------------------------------------------
# byte-level BPE


def test_byte_level_splits_characters_across_tokens(byte_level: Tokenizer) -> None:
    """The premise of the test: some tokens hold only part of a UTF-8 character."""
    ids = byte_level.encode("🧬 ꙮ 𝔘").ids
    assert any(FFFD in byte_level.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_one_token_at_a_time(byte_level: Tokenizer, text: str) -> None:
    ids = byte_level.encode(text).ids
    pieces, d = stream(byte_level, [], ids)
    assert "".join(pieces) == byte_level.decode(ids) == text
    assert d.text == text
    assert not any(FFFD in p for p in pieces)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_after_a_prompt(byte_level: Tokenizer, text: str) -> None:
    prompt = byte_level.encode("User said: «ok» 👍 then").ids
    ids = byte_level.encode(text).ids
    pieces, d = stream(byte_level, prompt, ids)
    full = byte_level.decode(prompt + ids)
    assert "".join(pieces) == full[len(byte_level.decode(prompt)):]
    assert not any(FFFD in p for p in pieces)


def test_held_character_is_released_when_complete(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("🧬").ids
    assert len(ids) > 1
    d = IncrementalDetokenizer(byte_level, [])
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "🧬"
    assert d.flush() == ""


def test_flush_releases_an_incomplete_character(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 🧬").ids
    d = IncrementalDetokenizer(byte_level, [])
    got = d.add(ids[:-1])
    assert got.startswith("ok") and FFFD not in got
    tail = d.flush()
    assert tail.endswith(FFFD) and got + tail == d.text == byte_level.decode(ids[:-1])


def test_prompt_ending_mid_character(byte_level: Tokenizer) -> None:
    """Ids split inside a character: the completed character belongs to the output."""
    ids = byte_level.encode("ab🧬cd").ids
    for cut in range(1, len(ids)):
        prompt, out = ids[:cut], ids[cut:]
        pieces, _ = stream(byte_level, prompt, out)
        visible = byte_level.decode(prompt).rstrip(FFFD)
        assert visible + "".join(pieces) == "ab🧬cd"


def test_special_tokens(byte_level: Tokenizer) -> None:
    end = tid(byte_level, "<|im_end|>")
    ids = byte_level.encode("fine, thanks").ids + [end]
    assert "".join(stream(byte_level, [], ids)[0]) == "fine, thanks"
    assert "".join(stream(byte_level, [], ids, skip=False)[0]) == "fine, thanks<|im_end|>"


@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_characters=FFFD), max_size=60),
       prompt=st.text(alphabet=st.characters(codec="utf-8", exclude_characters=FFFD), max_size=20),
       seed=st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
def test_byte_level_random_unicode(byte_level: Tokenizer, text: str, prompt: str,
                                   seed: int) -> None:
    ids = byte_level.encode(text).ids
    pids = byte_level.encode(prompt).ids
    rng = random.Random(seed)
    sizes = [rng.choice([1, 1, 1, 2, 3]) for _ in range(len(ids))]  # the engine may add several
    pieces, d = stream(byte_level, pids, ids, sizes)
    assert "".join(pieces) == text == d.text
    assert not any(FFFD in p for p in pieces)


# ------------------------------------------------------------------------------------------------
# Metaspace (sentencepiece-style: "▁" marks a word's leading space)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a sentencepiece style tokenizer test",
    "  two leading spaces, and  double  spaces",
])
def test_metaspace_spaces(sp_tokenizers: list[Tokenizer], text: str) -> None:
    for tok in sp_tokenizers:
        ids = tok.encode(text).ids
        pieces, _ = stream(tok, [], ids)
        assert "".join(pieces) == tok.decode(ids)
        # after a prompt, the first output word keeps its leading space
        prompt = tok.encode("Question: what is it?").ids
        pieces, _ = stream(tok, prompt, ids)
        full = tok.decode(prompt + ids)
        head = tok.decode(prompt)
        assert full.startswith(head)
        assert "".join(pieces) == full[len(head):]
        first_word = next(p for p in pieces if p)
        assert first_word.startswith(" ")


def test_metaspace_after_bos_only(sp_tokenizers: list[Tokenizer]) -> None:
    for tok in sp_tokenizers:
        bos = tid(tok, "<s>")
        ids = tok.encode("Hello world").ids
        pieces, _ = stream(tok, [bos], ids)
        assert "".join(pieces) == tok.decode([bos] + ids) == tok.decode(ids)


@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=25),
    prompt=st.lists(st.sampled_from(["the", "value", "is", "中文"]), max_size=6))
@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
def test_metaspace_random_words(sp_tokenizers: list[Tokenizer], words: list[str],
                                prompt: list[str]) -> None:
    for tok in sp_tokenizers:
        ids = tok.encode(" ".join(words)).ids
        pids = tok.encode(" ".join(prompt)).ids
        pieces, _ = stream(tok, pids, ids)
        full, head = tok.decode(pids + ids), tok.decode(pids)
        assert full.startswith(head)
        assert "".join(pieces) == full[len(head):]
        if not pids:
            assert "".join(pieces) == tok.decode(ids)


# ------------------------------------------------------------------------------------------------
# stop strings


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """The stop completed first (smallest end), ties to the one that starts first."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    if best is None:
        return text, False
    return text[: best[0] if include else best[1]], True


def feed_all(m: StopStringMatcher, deltas: list[str]) -> tuple[str, bool, list[str]]:
    out, stopped, after = [], False, []
    for dl in deltas:
        got, st_ = m.feed(dl)
        if stopped:
            after.append(got)
        out.append(got)
        stopped = stopped or st_
    out.append(m.flush())
    return "".join(out), stopped, after


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts, prev = [], 0
    for p in points + [len(text)]:
        parts.append(text[prev:p])
        prev = p
    return parts


@given(text=st.text(alphabet="abc d😀\n", max_size=40),
       stops=st.lists(st.text(alphabet="abc d😀\n", min_size=1, max_size=5), min_size=1,
                      max_size=4),
       cuts=st.lists(st.integers(0, 100), max_size=12), include=st.booleans())
@settings(max_examples=500, deadline=None)
def test_stop_strings_any_split(text: str, stops: list[str], cuts: list[int],
                                include: bool) -> None:
    want, want_stop = reference_stop(text, stops, include)
    got, stopped, after = feed_all(StopStringMatcher(stops, include), split(text, cuts))
    assert got == want and stopped == want_stop
    assert all(a == "" for a in after)


@given(text=st.text(alphabet="xyz ", max_size=30), cuts=st.lists(st.integers(0, 50), max_size=8))
@settings(max_examples=100, deadline=None)
def test_stop_strings_held_text_is_released(text: str, cuts: list[int]) -> None:
    """No stop ever matches; everything held as a possible stop prefix comes out by flush."""
    assume("xyzw" not in text)
    m = StopStringMatcher(["xyzw", "zz!"])
    emitted = []
    for dl in split(text, cuts):
        got, stopped = m.feed(dl)
        assert not stopped
        emitted.append(got)
    emitted.append(m.flush())
    assert "".join(emitted) == text


def test_stop_string_spanning_deltas() -> None:
    m = StopStringMatcher(["</answer>"])
    assert m.feed("The result is 42<") == ("The result is 42", False)
    assert m.feed("/ans") == ("", False)
    assert m.feed("wer> trailing") == ("", True)
    assert m.matched == "</answer>"
    assert m.feed("more") == ("", True) and m.flush() == ""
    m = StopStringMatcher(["</answer>"], include_stop=True)
    assert feed_all(m, ["42</", "answer>", "x"])[0] == "42</answer>"


def test_stop_completed_first_wins() -> None:
    # "c" completes before "abcd" could: the text ends before "c", split or not
    assert feed_all(StopStringMatcher(["abcd", "c"]), ["ab", "cd"])[0] == "ab"
    assert feed_all(StopStringMatcher(["abcd", "c"]), ["abcd"])[0] == "ab"
    # same end: the longer (earlier-starting) one
    assert feed_all(StopStringMatcher(["bc", "abc"]), ["xabc"])[0] == "x"


def test_no_stops_is_a_passthrough() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False) and m.flush() == ""


def test_detokenizer_and_stop_strings_together(byte_level: Tokenizer) -> None:
    text = "Sure 😀! The answer: 中文</s> ignored after"
    ids = byte_level.encode(text).ids
    d = IncrementalDetokenizer(byte_level, [])
    m = StopStringMatcher(["</s>"])
    out = []
    for i in ids:
        got, stopped = m.feed(d.add([i]))
        out.append(got)
        if stopped:
            break
    else:
        out.append(m.feed(d.flush())[0] + m.flush())
    assert "".join(out) == "Sure 😀! The answer: 中文"
