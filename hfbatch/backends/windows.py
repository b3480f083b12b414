"""Long texts cut into windows by the model's own tokenizer (--split tokens:N --overlap M).

A window is a span of the text's tokens: at most N tokens *as the model reads it* (special
tokens and the prompt included), consecutive windows share exactly M tokens, and together they
cover every token from the first to the last. A window is given as character offsets into the
text (`text[char_start:char_end]` is what gets embedded), taken from the tokenizer's offset
mapping, so nothing is guessed from word counts.

The model embeds the window's *text*, which the tokenizer reads afresh; at a cut inside a word
that can take a token more than the span had. `fit_windows` therefore checks every window as
the model will count it and moves the end of any that came out too long back until it fits,
then goes on from there, so the overlap stays exactly M tokens of the original tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import InputError


@dataclass(frozen=True)
class Window:
    """One window of a text: `text[char_start:char_end]`, read by the model as `n_tokens` tokens."""

    char_start: int
    char_end: int
    n_tokens: int


@dataclass(frozen=True)
class Windows:
    """The windows of one text, and the tokens the whole text has (specials and prompt included)."""

    spans: list[Window]
    tokens: int


Counter = Callable[[list[str]], list[int]]  # texts -> tokens as the model reads each (specials, prompt)


def token_spans(n: int, content: int, overlap: int, start: int = 0) -> list[tuple[int, int]]:
    """[start, end) token ranges from `start` over n tokens: at most `content` each, consecutive
    ones sharing `overlap`, the last ending at n. One (0, 0) range for a text without tokens."""
    if n == 0:
        return [(0, 0)]
    spans = []
    while True:
        end = min(start + content, n)
        spans.append((start, end))
        if end >= n:
            return spans
        start = end - overlap


def fit_windows(texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]], *, size: int, overlap: int,
                overhead: int, count: Counter, limit: int | None = None) -> list[Windows]:
    """The windows of each text. `offsets`: per text, each token's (start, end) characters, without
    special tokens; `overhead`: the tokens the model adds to any text (specials, the prompt);
    `count`: the model's own count of a list of texts; `limit`: the most tokens the model reads
    (what a larger N may be). Raises InputError when a window of `size` tokens leaves no room for
    more than the overlap, advising only values that work."""
    content = size - overhead
    if content <= overlap:
        raise InputError(
            f"--split tokens:{size} leaves {max(content, 0)} tokens of text per window once the model's "
            f"{overhead} special/prompt tokens are counted, not more than --overlap {overlap}; "
            f"{room_advice(size, overhead, overlap, limit)}"
        )
    planned = [token_spans(len(o), content, overlap) for o in offsets]

    def chars(i: int, span: tuple[int, int]) -> tuple[int, int]:
        o = offsets[i]
        return (o[span[0]][0], o[span[1] - 1][1]) if span[1] > span[0] else (0, len(texts[i]))

    # one batched count of every planned window; only texts with a window too long are redone
    flat = [(i, span) for i, spans in enumerate(planned) for span in spans]
    counted = count([texts[i][slice(*chars(i, span))] for i, span in flat]) if flat else []
    by_text: dict[int, list[int]] = {}
    for (i, _), n in zip(flat, counted):
        by_text.setdefault(i, []).append(n)
    out = []
    for i, spans in enumerate(planned):
        counts = by_text[i]
        if max(counts) > size:
            spans, counts = _refit(texts[i], offsets[i], content, overlap, size, count)
        whole = len(offsets[i]) + overhead
        out.append(Windows([Window(*chars(i, span), n) for span, n in zip(spans, counts)], whole))
    return out


def room_advice(size: int, overhead: int, overlap: int, limit: int | None) -> str:
    """What to change when `size`-token windows leave no room beyond `overlap`: only values that
    work (a larger N never above the model's `limit`, an --overlap below the window's room)."""
    content, need = size - overhead, overhead + overlap + 1
    fixes = []
    if limit is None or need <= limit:
        fixes.append(f"a larger N (at least {need}{f', at most {limit}' if limit else ''})")
    elif content < 1 and overhead < limit:  # N at the model's limit, with an overlap that fits it
        fixes.append(f"--split tokens:{limit} with --overlap {limit - overhead - 1} or less")
    if content >= 1:
        fixes.append(f"--overlap {content - 1} or less")
    if not fixes:  # the specials and the prompt alone fill what the model reads
        return f"the model reads {limit} tokens: use a shorter prompt."
    return "use " + " or ".join(fixes) + "."


def _refit(text: str, offsets: Sequence[tuple[int, int]], content: int, overlap: int, size: int,
           count: Counter) -> tuple[list[tuple[int, int]], list[int]]:
    """Windows one at a time, each end moved back until the window's text fits `size` tokens."""
    spans: list[tuple[int, int]] = []
    counts: list[int] = []
    start, n = 0, len(offsets)
    while True:
        end = min(start + content, n)
        while True:
            got = count([text[offsets[start][0]:offsets[end - 1][1]]])[0]
            if got <= size:
                break
            shorter = end - max(1, got - size)
            if shorter - start <= overlap:  # cannot fit and still move on: the tokenizer is pathological
                raise InputError(f"a window of this text cannot be cut to {size} tokens (characters "
                                 f"{offsets[start][0]}..{offsets[end - 1][1]}); use a larger --split tokens:N.")
            end = shorter
        spans.append((start, end))
        counts.append(got)
        if end >= n:
            return spans, counts
        start = end - overlap
