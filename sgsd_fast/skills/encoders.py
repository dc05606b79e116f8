"""Text encoders for skill retrieval: every encoder maps texts to L2-normalized row vectors.

* ``tfidf`` (default): needs nothing downloaded. Word/number tokens, sublinear term frequency
  ``1 + log(tf)``, smoothed idf ``log((1 + n) / (1 + df)) + 1``, L2-normalized rows. The
  vocabulary and idf are *fitted on the bank's item texts only* (`Encoder.fit`, called by the
  retriever whenever the bank version changes) and queries are projected onto that vocabulary:
  a query word that no item contains cannot raise any similarity, so leaving it out loses
  nothing, and keeping the query out of the fit lets the item matrix be cached per bank version.
* ``policy``: mean-pooled last hidden states of a Hugging Face causal LM (e.g. the policy being
  trained) — pass ``model=`` and ``tokenizer=``.
* ``sentence-transformers``: any sentence-transformers model by local path or cached id
  (``model=``); the package is imported only when this encoder is built.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

_TOKEN = re.compile(r"[^\W\d_]+|\d+(?:\.\d+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens and number tokens (``3.5`` stays one token)."""
    return _TOKEN.findall(text.casefold())


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return list(texts)


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (cosine 0 with everything)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


class Encoder:
    """Base class. `name` identifies the encoder and its configuration (it keys embedding caches)."""

    name: str = "encoder"

    def fit(self, corpus: Sequence[str]) -> Encoder:
        """Adapt to the bank's texts (no-op for pretrained encoders). Returns self."""
        _check_texts(corpus)
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class TfidfEncoder(Encoder):
    """TF-IDF with sublinear tf and L2 norm, in numpy (see the module docstring for the fit rule).

    `encode` before any `fit` fits on the texts being encoded. `name` includes a fingerprint of
    the fitted vocabulary so a cache can never mix vectors from two different fits.
    """

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._idf = np.zeros(0)
        self._fitted = False
        self.name = "tfidf"

    def fit(self, corpus: Sequence[str]) -> TfidfEncoder:
        corpus = _check_texts(corpus)
        df: Counter[str] = Counter()
        for text in corpus:
            df.update(set(tokenize(text)))
        terms = sorted(df)
        self._vocab = {term: i for i, term in enumerate(terms)}
        n = len(corpus)
        self._idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in terms], dtype=np.float64)
        self._fitted = True
        fingerprint = hashlib.sha256("\n".join(terms).encode("utf-8")).hexdigest()[:12]
        self.name = f"tfidf:{len(terms)}:{fingerprint}"
        return self

    @property
    def vocabulary(self) -> dict[str, int]:
        return dict(self._vocab)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not self._fitted:
            self.fit(texts)
        out = np.zeros((len(texts), len(self._vocab)), dtype=np.float64)
        for row, text in enumerate(texts):
            counts = Counter(t for t in tokenize(text) if t in self._vocab)
            for term, tf in counts.items():
                col = self._vocab[term]
                out[row, col] = (1.0 + math.log(tf)) * self._idf[col]
        return l2_normalize(out).astype(np.float32)


class PolicyEncoder(Encoder):
    """Mean-pooled last-layer hidden states of a Hugging Face model (padding excluded).

    Args:
        model: a transformers model that accepts ``output_hidden_states=True``.
        tokenizer: its tokenizer (a missing pad token falls back to the EOS token).
        batch_size: texts per forward pass.
        max_length: longer texts are truncated (item texts are short; this bounds memory).

    Retrievers cache item vectors per bank version, so while the policy trains, item vectors
    reflect the weights at the time that bank version was first embedded (queries use the
    current weights). Use a fixed model here when that drift matters.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int = 256) -> None:
        if model is None or tokenizer is None:
            raise ValueError("the 'policy' encoder needs model= and tokenizer= "
                             "(a Hugging Face model and its tokenizer)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        ident = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.name = f"policy:{ident}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = _check_texts(texts)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        rows: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start:start + self.batch_size]
                encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] or [pad_id]
                           for t in batch]
                width = max(len(ids) for ids in encoded)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, seq in enumerate(encoded):  # right padding: positions stay 0..len-1
                    ids[i, : len(seq)] = torch.tensor(seq)
                    mask[i, : len(seq)] = 1
                out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                hidden = out.hidden_states[-1].float()
                m = mask.to(device).unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
                rows.append(pooled.cpu().numpy().astype(np.float64))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalize(np.concatenate(rows)).astype(np.float32)


class SentenceTransformerEncoder(Encoder):
    """A sentence-transformers model loaded from a local path or the local cache (no download)."""

    def __init__(self, model: str, *, device: str | None = None, batch_size: int = 32) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError("the 'sentence-transformers' encoder needs model= (a local path or a cached model id)")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                "the 'sentence-transformers' encoder needs the sentence-transformers package: "
                "pip install 'sgsd-fast[embed]' (or use the default encoder 'tfidf')") from err
        self._model = SentenceTransformer(model, device=device, local_files_only=True)
        self.batch_size = batch_size
        self.name = f"st:{model}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        vectors = self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True)
        return l2_normalize(np.asarray(vectors, dtype=np.float64)).astype(np.float32)


ENCODERS = ("tfidf", "policy", "sentence-transformers")
ENCODER_ALIASES = {"st": "sentence-transformers"}


def make_encoder(name: str = "tfidf", **kw: Any) -> Encoder:
    """Build an encoder by name: ``"tfidf"`` (default, offline), ``"policy"`` (``model=``,
    ``tokenizer=``) or ``"sentence-transformers"`` / ``"st"`` (``model=`` path or cached id)."""
    if name == "tfidf":
        if kw:
            raise TypeError(f"the 'tfidf' encoder takes no options, got {sorted(kw)}")
        return TfidfEncoder()
    if name == "policy":
        return PolicyEncoder(kw.pop("model", None), kw.pop("tokenizer", None), **kw)
    if ENCODER_ALIASES.get(name, name) == "sentence-transformers":
        return SentenceTransformerEncoder(kw.pop("model", None), **kw)
    raise ValueError(f"encoder name must be one of {ENCODERS}, got {name!r}")
