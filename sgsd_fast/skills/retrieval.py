"""Teacher contexts for a problem: retrieve (skill, mistake) pairs from a bank and weight them.

Similarity mode (SPEC §4): embed the problem and every item, take the top-K skills and the top-K
mistakes by cosine separately (ties: earlier bank position first), pair rank i with rank i, and
weight pair k by ``softmax_k(score_k / temperature)`` where score_k is the mean of the pair's two
cosines. When one kind has fewer than K items (or none), the surplus pairs carry only the other
kind's note and their score is that note's cosine alone; the number of teachers is
``min(K, max(#skills, #mistakes))``, and an empty bank yields no teachers (an empty list).

Random mode (ablation): the same pair counts, items drawn without replacement by a generator
seeded from sha256(seed, problem_id) — stable across processes and Python versions — with
uniform weights.

Item embeddings are cached per (bank version, encoder name); the bank version is read on every
call, so an update written by `OnlineEvolver` (or any other process) is picked up on the next
call without any explicit invalidation.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from .encoders import Encoder
from .items import SkillItem
from .store import SkillBank

MODES = ("similarity", "random")


@dataclasses.dataclass(frozen=True)
class TeacherContext:
    """One teacher's privileged context: a skill and/or a mistake note, and its weight a_k."""

    skill: SkillItem | None
    mistake: SkillItem | None
    weight: float


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def problem_seed(problem_id: str, seed: int) -> int:
    """64-bit seed derived from (seed, problem_id) with sha256: identical in every process."""
    digest = hashlib.sha256(f"{seed}\x1f{problem_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


class Retriever:
    """Retrieves up to `k` teacher contexts per problem from `bank`.

    Args:
        bank: the skill bank (read at every call; updates are picked up automatically).
        encoder: see `sgsd_fast.skills.make_encoder`; its `fit` is called with all item texts
            whenever the bank version changes (TF-IDF fits its vocabulary there).
        k: number of skills and of mistakes retrieved (so at most k teachers).
        mode: ``"similarity"`` or ``"random"``.
        seed: random mode's seed (combined with the problem id).
        temperature: softmax temperature of the teacher weights (the paper: 1.0).
    """

    def __init__(self, bank: SkillBank, encoder: Encoder, *, k: int = 8, mode: str = "similarity",
                 seed: int = 0, temperature: float = 1.0) -> None:
        if not isinstance(bank, SkillBank):
            raise TypeError(f"bank must be a SkillBank, got {type(bank).__name__}")
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be an Encoder (see make_encoder), got {type(encoder).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.bank, self.encoder, self.k, self.mode, self.seed = bank, encoder, k, mode, seed
        self.temperature = float(temperature)
        self._cache_version: int | None = None
        self._items: dict[str, list[SkillItem]] = {"skill": [], "mistake": []}
        self._matrices: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def _refresh(self) -> int:
        version = self.bank.version
        if version != self._cache_version:
            items = self.bank.items(version=version) if version else []
            self._items = {kind: [item for item in items if item.kind == kind] for kind in ("skill", "mistake")}
            self._matrices.clear()  # one version's vectors at a time: the bank only moves forward
            self._cache_version = version
        return version

    def _item_matrices(self, version: int) -> dict[str, np.ndarray]:
        texts = [item.text for kind in ("skill", "mistake") for item in self._items[kind]]
        key = (version, self.encoder.name)
        if key not in self._matrices:
            self.encoder.fit(texts)
            key = (version, self.encoder.name)  # a fit may rename the encoder (TF-IDF vocabulary)
            matrix = self.encoder.encode(texts) if texts else np.zeros((0, 0), dtype=np.float32)
            n_skills = len(self._items["skill"])
            self._matrices[key] = {"skill": matrix[:n_skills], "mistake": matrix[n_skills:]}
        return self._matrices[key]

    def retrieve(self, question: str, problem_id: str) -> list[TeacherContext]:
        """Up to `k` teacher contexts for this problem, weights summing to 1 (empty bank: [])."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if not isinstance(problem_id, str):
            raise TypeError(f"problem_id must be a str, got {type(problem_id).__name__}")
        version = self._refresh()
        skills, mistakes = self._items["skill"], self._items["mistake"]
        n_pairs = min(self.k, max(len(skills), len(mistakes)))
        if n_pairs == 0:
            return []
        if self.mode == "random":
            rng = np.random.default_rng(problem_seed(problem_id, self.seed))
            s_idx = rng.permutation(len(skills))[: self.k].tolist()
            m_idx = rng.permutation(len(mistakes))[: self.k].tolist()
            weights = np.full(n_pairs, 1.0 / n_pairs)
        else:
            matrices = self._item_matrices(version)
            query = self.encoder.encode([question])[0]
            s_cos = matrices["skill"] @ query if skills else np.zeros(0)
            m_cos = matrices["mistake"] @ query if mistakes else np.zeros(0)
            # stable sort on -cos: equal similarities keep bank order, so results are reproducible
            s_idx = np.argsort(-s_cos, kind="stable")[: self.k].tolist()
            m_idx = np.argsort(-m_cos, kind="stable")[: self.k].tolist()
            scores = []
            for rank in range(n_pairs):
                sides = ([float(s_cos[s_idx[rank]])] if rank < len(s_idx) else []) + \
                        ([float(m_cos[m_idx[rank]])] if rank < len(m_idx) else [])
                scores.append(sum(sides) / len(sides))
            weights = _softmax(np.asarray(scores, dtype=np.float64) / self.temperature)
        return [
            TeacherContext(
                skill=skills[s_idx[rank]] if rank < len(s_idx) else None,
                mistake=mistakes[m_idx[rank]] if rank < len(m_idx) else None,
                weight=float(weights[rank]),
            )
            for rank in range(n_pairs)
        ]
