"""The test models of tests/kind_models.py load through sentence-transformers' own classes, as the
kinds they stand for, with outputs of the shape and range the real models give, and rebuild to the
same outputs (seeded)."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import SAMPLE_TEXTS

SENTENCE = "The kettle boils fast and the handle stays cool."


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config_sentence_transformers.json").read_text())


def _module_types(path: Path) -> list[str]:
    return [m["type"].rsplit(".", 1)[1] for m in json.loads((path / "modules.json").read_text())]


def _active(rows: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in rows.to_dense()]


def test_sparse_is_a_splade(sparse_model_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    assert _config(sparse_model_dir)["model_type"] == "SparseEncoder"
    assert _module_types(sparse_model_dir) == ["Transformer", "SpladePooling"]
    model = SparseEncoder(str(sparse_model_dir), device="cpu")
    assert model.similarity_fn_name == "dot"
    out = model.encode(SAMPLE_TEXTS)
    assert out.layout == torch.sparse_coo and out.shape == (len(SAMPLE_TEXTS), 30522)
    active = _active(out)
    nnz = [len(a) for a in active]
    assert all(5 <= n <= 400 for n in nnz), nnz  # SPLADE-like, not ~27,000 and never empty
    assert 30 <= nnz[SAMPLE_TEXTS.index(SENTENCE)] <= 300, nnz
    assert bool((out.coalesce().values() > 0).all())
    distinct = {frozenset(a) for a in active}
    assert len(distinct) == len(set(SAMPLE_TEXTS))  # only the duplicate text repeats its set
    tokens = {token for token, _ in model.decode(model.encode(SENTENCE))}
    assert {"kettle", "handle", "cool"} <= tokens  # a text activates its own words, as SPLADE does


def test_sparse_router_routes_queries_and_documents(sparse_router_model_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    path = sparse_router_model_dir
    assert _config(path)["model_type"] == "SparseEncoder"
    assert _module_types(path) == ["Router"]
    router = json.loads((path / "router_config.json").read_text())
    assert router["structure"] == {"query": ["query_0_SparseStaticEmbedding"],
                                   "document": ["document_0_Transformer", "document_1_SpladePooling"]}
    model = SparseEncoder(str(path), device="cpu")
    queries = model.encode_query(SAMPLE_TEXTS)
    documents = model.encode_document(SAMPLE_TEXTS)
    assert queries.shape == documents.shape == (len(SAMPLE_TEXTS), 30522)
    tokenizer = model.tokenizer
    for text, active in zip(SAMPLE_TEXTS, _active(queries)):
        # inference-free: a query is its own tokens (no special tokens), each with its static weight
        assert active == set(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert bool((queries.coalesce().values() > 0).all())
    assert not torch.equal(queries.to_dense(), documents.to_dense())
    assert all(len(q) < len(d) for q, d in zip(_active(queries), _active(documents)))
    # no task: the default route, documents
    assert torch.equal(model.encode(SAMPLE_TEXTS).to_dense(), documents.to_dense())
    scores = model.similarity(queries, documents)
    assert bool((scores.diagonal() > 0).all())  # a text's query and document share its tokens


def test_multivector_gives_one_vector_per_token(multivector_model_dir: Path) -> None:
    from sentence_transformers import MultiVectorEncoder

    path = multivector_model_dir
    config = _config(path)
    assert config["model_type"] == "MultiVectorEncoder"
    assert config["prompts"] == {"query": "[unused0] ", "document": "[unused1] "}
    assert _module_types(path) == ["Transformer", "Dense", "MultiVectorMask", "Normalize"]
    model = MultiVectorEncoder(str(path), device="cpu")
    documents = model.encode_document(SAMPLE_TEXTS)
    queries = model.encode_query(SAMPLE_TEXTS)
    assert isinstance(documents, list) and len(documents) == len(SAMPLE_TEXTS)
    tokenizer = model.tokenizer
    for text, vectors in zip(SAMPLE_TEXTS, documents):
        tokens = tokenizer.tokenize("[unused1] " + text)
        assert tokens[0] == "[unused1]"  # the marker is one token
        kept = [t for t in tokens if t not in string.punctuation]  # the document skiplist
        assert vectors.shape == (len(kept) + 2, 128)  # + [CLS] and [SEP]
        assert vectors.dtype == torch.float32
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(vectors)), atol=1e-5)
    assert all(q.shape == (32, 128) for q in queries)  # [MASK]-expanded to exactly 32
    scores = model.similarity(queries, documents)
    assert scores.shape == (len(SAMPLE_TEXTS), len(SAMPLE_TEXTS))


def test_cross_encoder_scores_in_unit_interval(cross_encoder_model_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    config = _config(cross_encoder_model_dir)
    assert config["model_type"] == "CrossEncoder"
    assert config["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
    model = CrossEncoder(str(cross_encoder_model_dir), device="cpu")
    assert model.num_labels == 1 and isinstance(model.activation_fn, torch.nn.Sigmoid)
    scores = model.predict([("does the kettle boil fast?", text) for text in SAMPLE_TEXTS] + [("q", "d")])
    assert scores.shape == (len(SAMPLE_TEXTS) + 1,)
    assert bool(((scores > 0) & (scores < 1)).all())
    assert len(set(scores.round(4).tolist())) >= len(set(SAMPLE_TEXTS))


def _outputs(kind: str, path: Path) -> list[torch.Tensor]:
    from sentence_transformers import CrossEncoder, MultiVectorEncoder, SparseEncoder

    if kind == "cross_encoder":
        return [torch.as_tensor(CrossEncoder(str(path), device="cpu").predict([("q", t) for t in SAMPLE_TEXTS]))]
    if kind == "multivector":
        model = MultiVectorEncoder(str(path), device="cpu")
        return [*model.encode_query(SAMPLE_TEXTS), *model.encode_document(SAMPLE_TEXTS)]
    model = SparseEncoder(str(path), device="cpu")
    return [model.encode_query(SAMPLE_TEXTS).to_dense(), model.encode_document(SAMPLE_TEXTS).to_dense()]


@pytest.mark.parametrize("kind, fixture", [("sparse", "sparse_model_dir"),
                                           ("sparse_inference_free", "sparse_router_model_dir"),
                                           ("multivector", "multivector_model_dir"),
                                           ("cross_encoder", "cross_encoder_model_dir")])
def test_builds_are_deterministic(kind: str, fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import kind_models
    from transformers.utils import logging as hf_logging

    builder = {"sparse": kind_models.build_sparse, "sparse_inference_free": kind_models.build_sparse_inference_free,
               "multivector": kind_models.build_multivector, "cross_encoder": kind_models.build_cross_encoder}[kind]
    first: Path = request.getfixturevalue(fixture)
    before = (torch.random.get_rng_state(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    second = builder(tmp_path)
    after = (torch.random.get_rng_state(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]  # building leaves no trace
    assert second != first
    for a, b in zip(_outputs(kind, first), _outputs(kind, second), strict=True):
        assert torch.equal(a, b)
