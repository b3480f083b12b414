"""Pair scorers: a cross-encoder (reranker) that reads a query and a document together and gives
one score, what `hfbatch score` computes. `LocalScorer` runs sentence-transformers' CrossEncoder
in this process (its `predict`, with the activation its config names); a remote one (TEI,
infinity /rerank) is made by `make_scorer` too.

A pair longer than the model reads is not truncated: the document is cut into windows that fit
beside the query (the model's own tokenizer; `overlap` tokens shared) and the pair's score is the
best window's (`aggregate` max) or their mean. A query that leaves no room for a window is
truncated as CrossEncoder.predict truncates, and says so (truncated = true).

Its own module because a scorer is not a Backend: it takes pairs, not texts, and gives a number,
not a vector; it shares with the embedding backends only the files, the tokenizer and the lazy load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from ..errors import BackendError, InputError, first_line
from .encoders import EncoderBackend
from .hub import read_json

if TYPE_CHECKING:
    from ..options import ScoreOptions

MIN_WINDOW_TOKENS = 8  # a query leaving fewer tokens than this for the document: the pair is truncated instead


class Pair(NamedTuple):
    query: str
    document: str


class Scored(NamedTuple):
    """One pair's result: its score, its tokens as one pair (untruncated), the windows it was
    scored in (1: whole), whether the model saw only part of it."""

    score: float
    count: int
    windows: int
    truncated: bool


class LocalScorer(EncoderBackend):
    """A CrossEncoder in this process (torch, fp32), as sentence-transformers' `predict` runs it."""

    kind = "cross-encoder"
    st_class = "CrossEncoder"
    sets_length = False  # the model's tokenizer reads its own model_max_length

    def __init__(self, model: str, *, aggregate: str = "max", overlap: int | None = None, **kwargs: Any):
        if kwargs.get("max_length") is not None:
            raise InputError("--max-length: a cross-encoder reads the pair up to its own length; long documents are "
                             "scored in windows (--aggregate max|mean); drop --max-length.")
        super().__init__(model, **kwargs)
        self.aggregate, self.overlap = aggregate, overlap
        self._labels_checked = False

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return f"{base}:aggregate={self.aggregate}:overlap={self.window_overlap}"

    @property
    def window_overlap(self) -> int:
        return self.overlap if self.overlap is not None else self.max_length // 8

    def check_labels(self) -> None:
        """One score per pair: a model with several labels (an NLI classifier) is refused, files only."""
        if self._labels_checked:
            return
        self._labels_checked = True
        config = read_json(self.files.dir / "config.json")
        config = config if isinstance(config, dict) else {}
        # transformers writes no id2label for its default of 2 labels (review: a 2-label model passed)
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels") or 2) if config else 1
        if labels > 1:
            raise InputError(f"{self.model_id} is a cross-encoder with {labels} labels (a classifier); `hfbatch score` "
                             "writes one score per pair: use a reranker (one label).")

    def tokenizer(self) -> Any:
        loaded = self.tokens.load()
        if loaded.hf is None:
            from .tokenizer import load_transformers

            loaded = load_transformers(self.tokens.model_dir, self.model_id, trust_remote_code=self.trust_remote_code)
        return loaded.hf

    def pair_counts(self, pairs: Sequence[Pair]) -> list[int]:
        """Tokens of each pair as the model reads it (specials included), untruncated."""
        if not pairs:
            return []
        encoded = self.tokenizer()([p.query for p in pairs], [p.document for p in pairs], truncation=False,
                                   add_special_tokens=True, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def windows(self, pair: Pair) -> list[str] | None:
        """The document's windows that fit beside the query, or None where the query leaves too little room."""
        specials = self.tokens.counts([""])[0]  # what a window costs beside its own tokens, read alone
        room = self.max_length - self.pair_counts([Pair(pair.query, "")])[0] + specials
        text_room = room - specials  # the document's own tokens a window holds
        if text_room < MIN_WINDOW_TOKENS:
            return None
        # (review: an overlap near the window made windows advance a token at a time, or none fit)
        overlap = min(self.window_overlap, text_room // 2)
        cut = self.tokens.split([pair.document], room, overlap)[0]
        return [pair.document[s.char_start:s.char_end] for s in cut.spans]

    def predict(self, pairs: Sequence[Pair], batch: int | None = None) -> np.ndarray:
        """predict's scores of `pairs`, at most `batch` pairs a forward pass (the job's batch size:
        a batch of long documents is many windows, never one call of them all)."""
        model = self.load()
        size = max(1, batch or len(pairs))
        out: list[np.ndarray] = []
        for start in range(0, len(pairs), size):
            part = pairs[start:start + size]
            try:
                scores = model.predict([list(p) for p in part], batch_size=len(part), show_progress_bar=False,
                                       convert_to_numpy=True)
            except Exception as exc:
                raise BackendError(f"{self.model_id} failed on a batch of {len(part)} pairs ({first_line(exc)}).") from exc
            scores = np.asarray(scores, dtype=np.float32)
            if scores.size != len(part):
                raise BackendError(f"{self.model_id} gave {scores.size} scores for {len(part)} pairs (a model with "
                                   "several labels?); `hfbatch score` writes one score per pair: use a reranker.")
            out.append(scores.reshape(len(part)))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, pairs: Sequence[Pair], counts: Sequence[int]) -> list[Scored]:
        """Each pair's Scored, in one model call over every pair and window of the batch."""
        self.check_labels()
        calls: list[Pair] = []
        owners: list[int] = []
        plans: list[tuple[int, bool]] = []  # per pair: windows, truncated
        for i, (pair, count) in enumerate(zip(pairs, counts)):
            cut = self.windows(pair) if count > self.max_length else None
            parts = [Pair(pair.query, w) for w in cut] if cut else [pair]
            calls += parts
            owners += [i] * len(parts)
            plans.append((len(parts), count > self.max_length and not cut))
        scores = self.predict(calls, batch=len(pairs)) if calls else np.zeros(0, np.float32)
        if not np.isfinite(scores).all():
            raise BackendError(f"{self.model_id} returned NaN or infinite scores; nothing was written.")
        by_pair: list[list[float]] = [[] for _ in pairs]
        for owner, value in zip(owners, scores):
            by_pair[owner].append(float(value))
        pick = max if self.aggregate == "max" else (lambda xs: float(np.mean(xs)))
        return [Scored(float(np.float32(pick(values))), int(count), n, cut)
                for values, count, (n, cut) in zip(by_pair, counts, plans)]

    def activation(self) -> str | None:
        """The activation predict applies: the loaded model's, else as its files name it (a run
        the cache served whole records it too)."""
        if self._model is not None:
            return type(self._model.activation_fn).__name__
        if self._files is None:
            return None
        from .remote_scoring import file_activation

        return file_activation(self._files.dir, self.trust_remote_code)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(aggregate=self.aggregate, overlap=self.window_overlap if self._files is not None else self.overlap,
                    activation=self.activation())
        return info


def make_scorer(opts: "ScoreOptions") -> Any:
    """The scorer registry: `local` (a CrossEncoder here) or a remote /rerank server. Builds only."""
    from .kinds import model_kind, settle_kind
    from .hub import resolve_model_dir

    if opts.backend == "local":
        root, _ = resolve_model_dir(opts.model or "")
        settle_kind(opts.model or "", model_kind(root), None, command="score")
        return LocalScorer(opts.model or "", device=opts.device or "auto", trust_remote_code=opts.trust_remote_code,
                           aggregate=opts.aggregate or "max", overlap=opts.overlap, max_length=opts.max_length)
    from .remote_scoring import RemoteScorer  # noqa: PLC0415 - only where asked for

    return RemoteScorer.from_options(opts)
