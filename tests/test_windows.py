"""hfbatch/backends/windows.py on its own: token_spans and fit_windows with a fake token counter.

No model here: texts are words `w0 w1 ...`, one token a word, and the "model" counts words plus
its special tokens (and, where a test says so, more for some windows)."""

from __future__ import annotations

import re
from typing import Callable

import pytest

from hfbatch.backends.windows import Window, Windows, fit_windows, token_spans
from hfbatch.errors import InputError

OVERHEAD = 2  # what the fake model adds to any text, like [CLS] ... [SEP]


def words(n: int, *, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def offsets_of(text: str) -> list[tuple[int, int]]:
    """One token a whitespace-separated word, as (start, end) characters."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def counter(extra: Callable[[list[str]], int] = lambda toks: 0, calls: list | None = None) -> Callable[[list[str]], list[int]]:
    """The fake model's count: its words, its specials, and `extra(words)` more."""
    def count(texts: list[str]) -> list[int]:
        if calls is not None:
            calls.append(list(texts))
        toks = [t.replace("\u200b", "").split() for t in texts]  # it drops zero-width spaces, as BERT's does
        return [len(t) + OVERHEAD + extra(t) for t in toks]
    return count


def token_ranges(text: str, windows: Windows) -> list[tuple[int, int]]:
    """Each window as a [start, end) range of the text's token indices, from its characters."""
    offsets = offsets_of(text)
    out = []
    for w in windows.spans:
        inside = [i for i, (a, b) in enumerate(offsets) if w.char_start <= a and b <= w.char_end]
        assert inside == list(range(inside[0], inside[-1] + 1)), "a window is not a run of consecutive tokens"
        assert (w.char_start, w.char_end) == (offsets[inside[0]][0], offsets[inside[-1]][1]), "a window cuts a token"
        out.append((inside[0], inside[-1] + 1))
    return out


def assert_window_rules(spans: list[tuple[int, int]], n: int, content: int, overlap: int) -> None:
    assert spans[0][0] == 0 and spans[-1][1] == n
    for start, end in spans:
        assert 0 < end - start <= content
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 - s1 == overlap, f"windows {(s0, e0)} and {(s1, e1)} share {e0 - s1} tokens, not {overlap}"
        assert s1 > s0 and e1 > e0  # every window moves on
    covered = set().union(*(range(s, e) for s, e in spans))
    assert covered == set(range(n))


# --- token_spans -----------------------------------------------------------------------------------

def test_token_spans_small_example() -> None:
    assert token_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert token_spans(10, 4, 0) == [(0, 4), (4, 8), (8, 10)]
    assert token_spans(10, 4, 1, start=3) == [(3, 7), (6, 10)]


def test_token_spans_of_no_tokens_is_one_empty_range() -> None:
    assert token_spans(0, 8, 2) == [(0, 0)]


def test_a_text_that_fits_is_one_window() -> None:
    assert token_spans(5, 10, 3) == [(0, 5)]
    assert token_spans(10, 10, 3) == [(0, 10)]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 100, 257])
@pytest.mark.parametrize("content, overlap", [(1, 0), (4, 0), (4, 3), (8, 2), (10, 9), (254, 32)])
def test_token_spans_cover_every_token_with_exact_overlap(n: int, content: int, overlap: int) -> None:
    spans = token_spans(n, content, overlap)
    assert_window_rules(spans, n, content, overlap)
    # windows are as long as allowed: only the last may be shorter
    assert all(end - start == content for start, end in spans[:-1])


# --- fit_windows -----------------------------------------------------------------------------------

def test_fit_windows_plans_windows_of_size_tokens_as_the_model_counts_them() -> None:
    text = words(40)
    [got] = fit_windows([text], [offsets_of(text)], size=12, overlap=3, overhead=OVERHEAD, count=counter())
    assert token_ranges(text, got) == [(0, 10), (7, 17), (14, 24), (21, 31), (28, 38), (35, 40)]
    assert [w.n_tokens for w in got.spans] == [12] * 5 + [5 + OVERHEAD]
    assert got.tokens == 40 + OVERHEAD  # the whole text, specials included
    for w, (start, end) in zip(got.spans, token_ranges(text, got)):
        assert isinstance(w, Window) and text[w.char_start:w.char_end] == words(end - start, start=start)


def test_an_inflated_window_has_its_end_moved_back_and_the_overlap_stays_exact() -> None:
    """The model reads windows holding w20 as 3 tokens longer (a cut inside a word can do that):
    those windows end earlier, and every window still shares exactly 3 tokens with the next."""
    text = words(40)
    count = counter(lambda toks: 3 if "w20" in toks else 0)
    [got] = fit_windows([text], [offsets_of(text)], size=12, overlap=3, overhead=OVERHEAD, count=count)
    spans = token_ranges(text, got)
    # planned (14, 24) and (21, 31) hold w20: 10 + 2 + 3 = 15 > 12, so they end 3 tokens earlier
    assert spans == [(0, 10), (7, 17), (14, 21), (18, 25), (22, 32), (29, 39), (36, 40)]
    assert_window_rules(spans, 40, 10, 3)
    for w in got.spans:  # each window's count is the model's count of its own text, and fits
        assert w.n_tokens == count([text[w.char_start:w.char_end]])[0] <= 12
    assert got.tokens == 40 + OVERHEAD


def test_only_the_text_with_a_window_too_long_is_refitted() -> None:
    plain, odd = words(30), words(30, start=100)
    count = counter(lambda toks: 5 if "w115" in toks else 0)
    got = fit_windows([plain, odd], [offsets_of(plain), offsets_of(odd)], size=12, overlap=2, overhead=OVERHEAD, count=count)
    assert token_ranges(plain, got[0]) == token_spans(30, 10, 2)
    odd_spans = token_ranges(odd, got[1])
    assert odd_spans != token_spans(30, 10, 2)
    assert_window_rules(odd_spans, 30, 10, 2)
    assert all(w.n_tokens <= 12 for w in got[1].spans)


def test_a_text_without_tokens_is_one_window_of_the_whole_text() -> None:
    text = "\u200b\u200b"  # characters a tokenizer drops
    [got] = fit_windows([text], [[]], size=12, overlap=3, overhead=OVERHEAD, count=counter())
    assert got == Windows([Window(0, len(text), OVERHEAD)], OVERHEAD)


def test_many_texts_keep_their_order() -> None:
    texts = [words(3), words(25, start=50), "", words(11, start=7)]
    got = fit_windows(texts, [offsets_of(t) for t in texts], size=8, overlap=1, overhead=OVERHEAD, count=counter())
    assert len(got) == 4
    for text, windows in zip(texts, got):
        n = len(offsets_of(text))
        assert windows.tokens == n + OVERHEAD
        if n:
            assert_window_rules(token_ranges(text, windows), n, 6, 1)


@pytest.mark.parametrize("size, overhead, overlap, room", [(10, 2, 8, 8), (10, 2, 9, 8), (3, 4, 0, 0), (34, 2, 32, 32)])
def test_no_room_beyond_the_overlap_is_an_input_error_naming_the_numbers(size: int, overhead: int, overlap: int,
                                                                          room: int) -> None:
    text = words(50)
    with pytest.raises(InputError) as caught:
        fit_windows([text], [offsets_of(text)], size=size, overlap=overlap, overhead=overhead, count=counter())
    message = str(caught.value)
    assert f"--split tokens:{size}" in message
    assert f"leaves {room} tokens" in message
    assert f"{overhead} special/prompt tokens" in message
    assert f"--overlap {overlap}" in message
    assert f"at least {overhead + overlap + 1}" in message
    assert "\n" not in message


def test_one_token_beyond_the_overlap_is_enough() -> None:
    text = words(6)
    [got] = fit_windows([text], [offsets_of(text)], size=5, overlap=2, overhead=OVERHEAD, count=counter())
    assert token_ranges(text, got) == [(0, 3), (1, 4), (2, 5), (3, 6)]


def test_a_window_that_cannot_be_cut_to_size_is_an_input_error() -> None:
    text = words(30)
    always_too_long = lambda texts: [99 for _ in texts]  # noqa: E731
    with pytest.raises(InputError, match="cannot be cut to 12 tokens"):
        fit_windows([text], [offsets_of(text)], size=12, overlap=3, overhead=OVERHEAD, count=always_too_long)
