"""A real query -> document set that needs no network: the Python standard library's docstrings.

Query: the summary paragraph of a function's or class's docstring ("Return the number of
non-overlapping occurrences of ..."); document: the rest of that docstring (its details,
arguments, caveats). Each query has exactly one relevant document, and every other pair's body is
a distractor, so recall@10 = the share of queries whose own body ranks in the top 10 of all
bodies. Built from the interpreter running the benchmark (CPython 3.11 here), deterministic.
"""

from __future__ import annotations

import ast
import inspect
import random
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_docstrings(kinds: tuple[type, ...] = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) -> Iterator[str]:
    """Every docstring (cleaned) of the given node kinds in the stdlib, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            if doc:
                yield inspect.cleandoc(doc)


def docstring_pairs(count: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` (query, document) pairs sampled from the stdlib's docstrings."""
    pairs: dict[str, str] = {}
    for doc in stdlib_docstrings():
        summary, _, body = doc.partition("\n\n")
        summary, body = " ".join(summary.split()), body.strip()
        if len(summary.split()) >= 4 and len(body) >= 200 and summary not in pairs:
            pairs[summary] = body
    chosen = random.Random(seed).sample(sorted(pairs.items()), min(count, len(pairs)))
    return [q for q, _ in chosen], [d for _, d in chosen]


def recall_at_10(queries: np.ndarray, documents: np.ndarray) -> float:
    """Share of queries i whose document i is among the 10 nearest documents by cosine."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    scores = q @ d.T
    own = np.diag(scores)
    rank = (scores > own[:, None]).sum(1)  # documents scoring strictly above the right one
    return float((rank < 10).mean())
