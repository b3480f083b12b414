"""validate.py: every row is either a text to embed or marked with a reason; counts are the tokenizer's."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfbatch.backends.local import LocalBackend
from hfbatch.errors import InputError
from hfbatch.io.columns import check_columns
from hfbatch.io.readers import Chunk
from hfbatch.validate import validate_chunk

PATH = Path("data.csv")


def _validate(values, *, on_invalid="mark", max_length=8, invalid=None, type_=pa.string()):
    chunk = Chunk(pa.record_batch({"text": pa.array(values, type=type_)}), first_row=100, invalid=invalid or {})
    return validate_chunk(chunk, path=PATH, text_column="text", on_invalid=on_invalid, max_length=max_length,
                          token_counts=lambda texts: [len(t.split()) + 2 for t in texts])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["", " ", "\t\n", "a b c d e f g h i"]))))
def test_every_row_is_a_text_or_a_reason(values) -> None:
    v = _validate(values)
    assert len(v.texts) == len(v.errors) == len(v.n_tokens) == len(v.truncated) == len(values)
    for value, text, error, n, cut in zip(values, v.texts, v.errors, v.n_tokens, v.truncated):
        ok = isinstance(value, str) and value.strip() != ""
        assert (text is not None) == ok and (error is None) == ok
        if ok:
            assert text == value  # the exact text goes on; the model truncates, not us
            full = len(value.split()) + 2
            assert n == min(full, 8) and cut == (full > 8)
        else:
            assert n is None and cut is None


def test_reasons() -> None:
    v = _validate(["ok", None, "", "   ", "fine"], invalid={4: "not a string (int)"})
    assert v.errors == [None, "null text", "empty text", "whitespace-only text", "not a string (int)"]
    assert v.valid_rows == [0]


def test_non_string_column_marks_every_value() -> None:
    v = _validate([1, None, 3], type_=pa.int64())
    assert v.errors == ["not a string (int64)", "null text", "not a string (int64)"]


def test_fail_names_file_row_and_column() -> None:
    with pytest.raises(InputError, match=r"data\.csv: row 102, column 'text': empty text; fix the row"):
        _validate(["ok", "", "x"], on_invalid="fail")


def test_real_tokenizer_counts_and_truncation() -> None:
    backend = LocalBackend("sentence-transformers/all-MiniLM-L6-v2")
    text = "unbelievably tokenization-heavy words"
    chunk = Chunk(pa.record_batch({"text": [text, "hi"]}), first_row=0)
    v = validate_chunk(chunk, path=PATH, text_column="text", on_invalid="mark", max_length=5,
                       token_counts=backend.token_counts)
    full = backend.token_counts([text])[0]
    assert full > 5  # word pieces, not words: more tokens than the 3 words
    assert v.n_tokens == [5, 3] and v.truncated == [True, False]


def test_check_columns() -> None:
    schema = pa.schema([("id", pa.int64()), ("body", pa.string()), ("embedding", pa.string())])
    with pytest.raises(InputError, match="no column 'text'; columns are: id, body, embedding"):
        check_columns(PATH, schema, "text", None)
    with pytest.raises(InputError, match="already has column\\(s\\) embedding"):
        check_columns(PATH, schema, "body", None)
    check_columns(PATH, schema, "body", ["id"])  # leaving the clashing column out is the fix
