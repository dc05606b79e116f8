"""Online self-evolution of the bank's dynamic items during training (SPEC §4).

At every step that is a positive multiple of `every`, if the step's success rate is below
`success_threshold`, the step's rollouts become new notes (successes -> skills, failures ->
mistakes, with the cold start's extraction prompts), which are merged with the current dynamic
items of the same kind (the cold start's hierarchical merge). Per kind at most
``min(cap, previous + max_new)`` dynamic items are kept — the first ones of the merged list
(the merge prompt asks for the most widely useful first; when the merge falls back to its input,
the previous items come first, so new notes fill only the free slots). Notes whose text equals a
static item are dropped (the static one already says it). Static items are never touched.

Each update is one bank transaction, hence one new version with a snapshot; retrievers read the
bank version on every call, so their caches are invalidated by the version change itself.
"""
from __future__ import annotations

from collections.abc import Sequence

from .items import KINDS, SkillItem, dedupe_key, problem_hash
from .merge import GenerateFn, Note, RenderFn, full_reply, merge_notes, prompt_with_prefill, render_plain
from .parsing import parse_items
from .prompts import extraction_text
from .store import SkillBank


class OnlineEvolver:
    """Periodically turns the training step's rollouts into dynamic bank items.

    Args:
        bank: the run's bank (its dynamic items are rewritten; static ones never).
        generate_fn: rendered prompts -> replies (the extractor/merger LLM, usually the policy, greedy).
        every: update period in optimizer steps (steps 0, every, 2*every, ...: step 0 is skipped).
        success_threshold: update only when the step's success rate (reward > 0) is below this.
        max_new: at most this many dynamic items per kind more than before the update.
        cap: at most this many dynamic items per kind.
        render_fn: chat messages -> prompt string (pass the tokenizer's chat template).
        max_items: notes kept per rollout reply (SPEC: 3).
        group_size: merge group size (SPEC: 32).
        model_name: recorded in provenance.
        batch_size: prompts per `generate_fn` call.
        prefill: end extraction/merge prompts with the opening of the JSON reply (see
            `sgsd_fast.skills.prompts.REPLY_PREFIX`).
    """

    def __init__(self, bank: SkillBank, generate_fn: GenerateFn, *, every: int = 25, success_threshold: float = 0.8,
                 max_new: int = 5, cap: int = 30, render_fn: RenderFn = render_plain, max_items: int = 3,
                 group_size: int = 32, model_name: str = "", batch_size: int = 16, prefill: bool = True) -> None:
        if not isinstance(bank, SkillBank):
            raise TypeError(f"bank must be a SkillBank, got {type(bank).__name__}")
        if not callable(generate_fn):
            raise TypeError("generate_fn must be callable: list of rendered prompts -> list of replies")
        for name, value in (("every", every), ("max_items", max_items), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("max_new", max_new), ("cap", cap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(success_threshold, (int, float)) or not 0.0 <= success_threshold <= 1.0:
            raise ValueError(f"success_threshold must be in [0, 1], got {success_threshold!r}")
        self.bank, self.generate_fn, self.render_fn = bank, generate_fn, render_fn
        self.every, self.success_threshold, self.max_new, self.cap = every, float(success_threshold), max_new, cap
        self.max_items, self.group_size, self.batch_size = max_items, group_size, batch_size
        self.model_name = model_name
        self.prefill = bool(prefill)

    def should_update(self, step: int, rewards: Sequence[float]) -> bool:
        if step <= 0 or step % self.every != 0 or not rewards:
            return False
        return sum(float(r) > 0 for r in rewards) / len(rewards) < self.success_threshold

    def maybe_update(self, step: int, questions: Sequence[str], completions: Sequence[str],
                     rewards: Sequence[float], *, answers: Sequence[str] | None = None) -> dict:
        """Update the dynamic items if this step calls for it; returns metrics, or {} when skipped.

        Metrics: ``skills_added``/``mistakes_added`` (new ids), ``skills_removed``/``mistakes_removed``,
        ``dynamic_skills``/``dynamic_mistakes``, ``total_skills``/``total_mistakes``, ``candidates``,
        ``parse_failures``, ``merge_calls``, ``success_rate`` and the new bank ``version``.
        `answers` (optional) show the correct answer to the mistake extractor.
        """
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        n = len(questions)
        if len(completions) != n or len(rewards) != n or (answers is not None and len(answers) != n):
            raise ValueError(f"questions, completions, rewards (and answers) must have equal lengths, got "
                             f"{n}, {len(completions)}, {len(rewards)}"
                             + (f", {len(answers)}" if answers is not None else ""))
        if not self.should_update(step, rewards):
            return {}
        kinds = ["skill" if float(r) > 0 else "mistake" for r in rewards]
        prompts = [prompt_with_prefill(self.render_fn, extraction_text(
            kind, q, c, answer=answers[i] if answers is not None else "", max_items=self.max_items), kind, self.prefill)
            for i, (kind, q, c) in enumerate(zip(kinds, questions, completions))]
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            out = list(self.generate_fn(batch))
            if len(out) != len(batch):
                raise ValueError(f"generate_fn returned {len(out)} replies for {len(batch)} prompts")
            replies += out
        new_notes: dict[str, list[Note]] = {kind: [] for kind in KINDS}
        parse_failures = 0
        for kind, question, reply in zip(kinds, questions, replies):
            parsed = parse_items(full_reply(reply, kind, self.prefill), kind, max_items=self.max_items)
            parse_failures += parsed.failed
            new_notes[kind] += [Note(fields, (problem_hash(question),)) for fields in parsed.items]

        metrics: dict = {"success_rate": sum(k == "skill" for k in kinds) / n, "parse_failures": parse_failures,
                         "candidates": sum(len(v) for v in new_notes.values()), "merge_calls": 0}
        # Merge outside the bank transaction: LLM calls are slow and must not hold the write lock.
        base_version = self.bank.version
        static_keys = {item.key for item in self.bank.items(origin="static", version=base_version)}
        previous = {kind: self.bank.items(kind, origin="dynamic", version=base_version) for kind in KINDS}
        kept: dict[str, list[Note]] = {}
        for kind in KINDS:
            limit = min(self.cap, len(previous[kind]) + self.max_new)
            old = [Note(dict(item.fields), tuple(item.provenance.get("problem_hashes", ())))
                   for item in previous[kind]]
            if new_notes[kind]:
                merged, stats = merge_notes(kind, old + new_notes[kind], self.generate_fn,
                                            render_fn=self.render_fn, group_size=self.group_size,
                                            batch_size=self.batch_size, prefill=self.prefill)
                metrics["merge_calls"] += stats.calls
                metrics["parse_failures"] += stats.parse_failures
                kept[kind] = [note for note in merged if dedupe_key(kind, note.fields) not in static_keys][:limit]
            else:
                kept[kind] = old[:limit]
        with self.bank.transaction(f"online update at step {step}") as tx:
            if self.bank.version != base_version:
                raise RuntimeError(f"the bank moved from version {base_version} to {self.bank.version} during the "
                                   "online update; only one writer may update a run's bank")
            for kind in KINDS:
                added, removed = self._replace(tx, kind, previous[kind], kept[kind], step)
                plural = kind + "s"
                metrics[f"{plural}_added"] = added
                metrics[f"{plural}_removed"] = removed
                metrics[f"dynamic_{plural}"] = len(kept[kind])
                metrics[f"total_{plural}"] = len(tx.items(kind))
        metrics["version"] = self.bank.version
        return metrics

    def _replace(self, tx, kind: str, previous: list[SkillItem], kept: list[Note], step: int) -> tuple[int, int]:
        """Make the dynamic items of `kind` equal `kept`; unchanged notes keep their item (and id)."""
        keep_keys = {dedupe_key(kind, note.fields) for note in kept}
        removed = 0
        for item in previous:
            if item.key not in keep_keys:
                tx.remove(item.id)
                removed += 1
        present = {item.key for item in tx.items(kind, origin="dynamic")}
        added = 0
        for note in kept:
            item = SkillItem.new(kind, note.fields, origin="dynamic", provenance={
                "source": "online", "step": step, "model": self.model_name,
                "outcome": "success" if kind == "skill" else "failure", "problem_hashes": list(note.sources)})
            if item.key not in present:
                tx.add(item)
                present.add(item.key)
                added += 1
        return added, removed
