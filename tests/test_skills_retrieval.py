"""Encoders, retrieval ranking/pairing/weights, random mode, and the teacher prompt."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from sgsd_fast.skills import Retriever, SkillBank, SkillItem, make_encoder
from sgsd_fast.skills.encoders import Encoder, TfidfEncoder, tokenize


def skill(title: str) -> SkillItem:
    return SkillItem.new("skill", {"title": title, "principle": f"principle of {title}", "when_to_apply": "often"})


def mistake(name: str) -> SkillItem:
    return SkillItem.new("mistake", {"description": name, "why_it_happens": "because", "how_to_avoid": "care"})


class TableEncoder(Encoder):
    """Encodes each text to the vector of the first table key it contains (a chosen geometry)."""

    name = "table"

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.fitted_on: list[list[str]] = []

    def fit(self, corpus):
        self.fitted_on.append(list(corpus))
        return self

    def encode(self, texts):
        return np.stack([next(v for k, v in self.table.items() if k in t) for t in texts]).astype(np.float32)


def at_cosine(c: float) -> np.ndarray:
    """Unit vector with cosine exactly c to the query direction e0."""
    return np.array([c, math.sqrt(1 - c * c), 0.0])


COS = {"sk_a": 0.9, "sk_b": 0.5, "sk_c": -0.2, "sk_d": 0.7, "mi_a": 0.1, "mi_b": 0.8, "mi_c": 0.3}


@pytest.fixture()
def bank(tmp_path):
    b = SkillBank(tmp_path / "bank.db")
    with b.transaction("seed") as tx:
        for name in ("sk_a", "sk_b", "sk_c", "sk_d"):
            tx.add(skill(name))
        for name in ("mi_a", "mi_b", "mi_c"):
            tx.add(mistake(name))
    return b


def encoder() -> TableEncoder:
    table = {name: at_cosine(c) for name, c in COS.items()}
    table["QUERY"] = np.array([1.0, 0.0, 0.0])
    return TableEncoder(table)


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_topk_ranking_pairing_and_softmax_weights(bank):
    ctxs = Retriever(bank, encoder(), k=3).retrieve("QUERY problem", "p0")
    pairs = [(c.skill.fields["title"], c.mistake.fields["description"]) for c in ctxs]
    assert pairs == [("sk_a", "mi_b"), ("sk_d", "mi_c"), ("sk_b", "mi_a")]
    expected = softmax([(0.9 + 0.8) / 2, (0.7 + 0.3) / 2, (0.5 + 0.1) / 2])
    assert [c.weight for c in ctxs] == pytest.approx(expected, abs=1e-6)
    assert sum(c.weight for c in ctxs) == pytest.approx(1.0)

    sharp = Retriever(bank, encoder(), k=3, temperature=0.1).retrieve("QUERY problem", "p0")
    assert [c.weight for c in sharp] == pytest.approx(softmax([8.5, 5.0, 3.0]), abs=1e-5)


def test_kind_with_fewer_items_leaves_pairs_one_sided(bank):
    ctxs = Retriever(bank, encoder(), k=8).retrieve("QUERY", "p0")
    assert len(ctxs) == 4  # min(k, max(#skills=4, #mistakes=3))
    assert [c.mistake is None for c in ctxs] == [False, False, False, True]
    assert ctxs[3].skill.fields["title"] == "sk_c"
    expected = softmax([(0.9 + 0.8) / 2, (0.7 + 0.3) / 2, (0.5 + 0.1) / 2, -0.2])
    assert [c.weight for c in ctxs] == pytest.approx(expected, abs=1e-6)


def test_empty_and_single_kind_banks(tmp_path):
    empty = SkillBank(tmp_path / "empty.db")
    assert Retriever(empty, encoder(), k=4).retrieve("QUERY", "p") == []
    only_mistakes = SkillBank(tmp_path / "m.db")
    with only_mistakes.transaction("seed") as tx:
        tx.add(mistake("mi_a"))
        tx.add(mistake("mi_b"))
    ctxs = Retriever(only_mistakes, encoder(), k=4).retrieve("QUERY", "p")
    assert [(c.skill, c.mistake.fields["description"]) for c in ctxs] == [(None, "mi_b"), (None, "mi_a")]
    assert [c.weight for c in ctxs] == pytest.approx(softmax([0.8, 0.1]), abs=1e-6)


def test_ties_keep_bank_order(tmp_path):
    b = SkillBank(tmp_path / "b.db")
    with b.transaction("seed") as tx:
        for name in ("tie_z", "tie_y", "tie_x"):
            tx.add(skill(name))
    enc = TableEncoder({"tie": at_cosine(0.5), "QUERY": np.array([1.0, 0.0, 0.0])})
    ctxs = Retriever(b, enc, k=2).retrieve("QUERY", "p")
    assert [c.skill.fields["title"] for c in ctxs] == ["tie_z", "tie_y"]
    assert [c.weight for c in ctxs] == pytest.approx([0.5, 0.5])


def test_retriever_sees_new_versions_and_refits(bank):
    enc = encoder()
    enc.table = {"sk_new": np.array([1.0, 0.0, 0.0]), **enc.table}
    retriever = Retriever(bank, enc, k=2)
    first = retriever.retrieve("QUERY", "p")
    retriever.retrieve("QUERY again", "p")
    assert len(enc.fitted_on) == 1  # cached for the unchanged version
    with bank.transaction("add") as tx:
        tx.add(skill("sk_new"))
    second = retriever.retrieve("QUERY", "p")
    assert first[0].skill.fields["title"] == "sk_a" and second[0].skill.fields["title"] == "sk_new"
    assert len(enc.fitted_on) == 2 and len(enc.fitted_on[1]) == 8


def test_random_mode_is_seeded_per_problem_with_uniform_weights(bank):
    r = Retriever(bank, encoder(), k=3, mode="random", seed=7)
    a = r.retrieve("any text", "problem-1")
    b = Retriever(bank, encoder(), k=3, mode="random", seed=7).retrieve("other text", "problem-1")
    assert [(c.skill.id, c.mistake.id) for c in a] == [(c.skill.id, c.mistake.id) for c in b]
    assert [c.weight for c in a] == pytest.approx([1 / 3] * 3)
    assert len({c.skill.id for c in a}) == 3 and len({c.mistake.id for c in a}) == 3  # no repeats
    selections = {tuple(c.skill.id for c in r.retrieve("q", f"problem-{i}")) for i in range(12)}
    assert len(selections) > 3  # different problems get different draws
    other_seed = {tuple(c.skill.id for c in Retriever(bank, encoder(), k=3, mode="random", seed=8)
                        .retrieve("q", f"problem-{i}")) for i in range(12)}
    assert other_seed != selections


def test_random_mode_is_stable_across_processes(bank):
    script = ("import sys; from sgsd_fast.skills import *; "
              "b = SkillBank(sys.argv[1], create=False); "
              "print([(c.skill.id, c.mistake.id) for c in Retriever(b, make_encoder(), k=3, mode='random', seed=3)"
              ".retrieve('q', 'abc')])")
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        outs.add(subprocess.run([sys.executable, "-c", script, str(bank.path)], env=env, capture_output=True,
                                text=True, check=True).stdout)
    here = str([(c.skill.id, c.mistake.id) for c in Retriever(bank, make_encoder(), k=3, mode="random", seed=3)
                .retrieve("q", "abc")]) + "\n"
    assert outs == {here}


def test_retriever_rejects_bad_arguments(bank):
    with pytest.raises(ValueError, match="k must be a positive int"):
        Retriever(bank, encoder(), k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        Retriever(bank, encoder(), mode="best")
    with pytest.raises(TypeError, match="encoder must be an Encoder"):
        Retriever(bank, object())
    with pytest.raises(TypeError, match="problem_id must be a str"):
        Retriever(bank, encoder()).retrieve("QUERY", 3)


def test_tfidf_matches_hand_computation():
    enc = TfidfEncoder().fit(["apple apple banana", "banana cherry"])
    idf_rare = math.log(3 / 2) + 1  # df = 1 of n = 2, smoothed
    doc = np.array([(1 + math.log(2)) * idf_rare, 1.0, 0.0])  # apple, banana, cherry
    got = enc.encode(["apple apple banana", "Cherry! unknown words"])
    assert enc.vocabulary == {"apple": 0, "banana": 1, "cherry": 2}
    assert got[0] == pytest.approx(doc / np.linalg.norm(doc), abs=1e-6)
    assert got[1] == pytest.approx([0.0, 0.0, 1.0])
    assert np.all(enc.encode(["nothing known"]) == 0)
    assert tokenize("Add 3.5 kg, then 12!") == ["add", "3.5", "kg", "then", "12"]


def test_tfidf_retrieval_prefers_lexical_overlap(tmp_path):
    b = SkillBank(tmp_path / "b.db")
    with b.transaction("seed") as tx:
        tx.add(SkillItem.new("skill", {"title": "Order of operations", "principle": "multiply before adding",
                                       "when_to_apply": "mixed expressions with brackets"}))
        tx.add(SkillItem.new("skill", {"title": "Share equally", "principle": "divide the total among friends",
                                       "when_to_apply": "sharing cookies or sweets"}))
    r = Retriever(b, make_encoder("tfidf"), k=1)
    top = r.retrieve("Iris shares 20 cookies equally among 5 friends.", "p")[0]
    assert top.skill.fields["title"] == "Share equally"
    assert r.retrieve("What is 3 + 4 times 2 with brackets?", "q")[0].skill.fields["title"] == "Order of operations"


def test_make_encoder_errors():
    with pytest.raises(ValueError, match="encoder name must be one of"):
        make_encoder("word2vec")
    with pytest.raises(ValueError, match="needs model= and tokenizer="):
        make_encoder("policy")
    with pytest.raises(TypeError, match="takes no options"):
        make_encoder("tfidf", model="x")


def test_policy_encoder_mean_pools_without_padding_leakage():
    from sgsd_fast.models import tiny_random_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_random_model(tok).eval()
    enc = make_encoder("policy", model=model, tokenizer=tok, batch_size=4)
    alone = enc.encode(["short"])
    batched = enc.encode(["short", "a much longer text that forces padding of the first"])
    assert batched.shape == (2, model.config.hidden_size)
    assert np.linalg.norm(batched, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert batched[0] == pytest.approx(alone[0], abs=1e-5)


def test_sentence_transformers_encoder_explains_missing_package():
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is not None:
        pytest.skip("sentence-transformers is installed here")
    with pytest.raises(ImportError, match=r"pip install 'sgsd-fast\[embed\]'"):
        make_encoder("sentence-transformers", model="some/local-model")
    with pytest.raises(ValueError, match="needs model="):
        make_encoder("st")
