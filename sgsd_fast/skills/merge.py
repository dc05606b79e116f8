"""Hierarchical LLM merge of candidate notes (SPEC §4), shared by the cold start and online updates.

Round structure: split the current notes into groups of `group_size` (in order), ask the LLM
once per group for a merged list, concatenate the replies and exact-dedupe. Stop after a round
whose input was a single group, or after `max_stale_rounds` consecutive rounds that did not
shrink the set (after such a round the notes are dealt round-robin across groups, so the next
round groups notes that have not been compared yet). A group of one note is passed through
without a call.

Failure policy — never lose notes because the LLM misbehaved: if a reply cannot be parsed, or
it returns *more* notes than it was given, the group's input notes are kept unchanged (and the
event is counted).

Provenance: every note carries the set of source-problem hashes it was derived from. A merged
note that is textually identical to one of its group's inputs keeps that input's sources; any
other merged note gets the union of the group's sources.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Protocol

from .items import FIELDS, dedupe_key
from .parsing import parse_items
from .prompts import REPLY_PREFIX, merge_text

GenerateFn = Callable[[list[str]], list[str]]
RenderFn = Callable[[list[dict]], str]


def render_plain(messages: list[dict]) -> str:
    """Fallback renderer when no chat template is available: the message contents, in order."""
    return "\n\n".join(str(m["content"]) for m in messages)


@dataclasses.dataclass(frozen=True)
class Note:
    """A candidate note: its required text fields and the problems it came from."""

    fields: dict[str, str]
    sources: tuple[str, ...] = ()


@dataclasses.dataclass
class MergeStats:
    calls: int = 0
    parse_failures: int = 0
    malformed_items: int = 0
    kept_unmerged: int = 0  # groups kept as-is (bad reply, or a reply larger than its input)
    rounds: int = 0
    n_in: int = 0
    n_out: int = 0


class MergeCheckpoint(Protocol):
    """Persists finished group merges so an interrupted merge resumes without repeating calls."""

    def get(self, kind: str, round_index: int, group_index: int, input_hash: str) -> list[Note] | None: ...

    def put(self, kind: str, round_index: int, group_index: int, input_hash: str, notes: list[Note]) -> None: ...


def exact_dedupe(kind: str, notes: Sequence[Note]) -> list[Note]:
    """First occurrence of each normalized text wins; duplicates pool their sources into it."""
    order: list[str] = []
    merged: dict[str, Note] = {}
    for note in notes:
        key = dedupe_key(kind, note.fields)
        if key in merged:
            kept = merged[key]
            sources = tuple(dict.fromkeys(kept.sources + note.sources))
            merged[key] = Note(kept.fields, sources)
        else:
            merged[key] = note
            order.append(key)
    return [merged[key] for key in order]


def group_hash(kind: str, notes: Sequence[Note]) -> str:
    payload = json.dumps([kind, [[n.fields[f] for f in FIELDS[kind]] for n in notes]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def prompt_with_prefill(render_fn: RenderFn, content: str, kind: str, prefill: bool) -> str:
    """Rendered one-turn prompt, followed by the kind's JSON reply prefix when `prefill`."""
    prompt = render_fn([{"role": "user", "content": content}])
    return prompt + REPLY_PREFIX[kind] if prefill else prompt


def full_reply(reply: str, kind: str, prefill: bool) -> str:
    """The reply as the model wrote it after the prompt, including a prefilled opening."""
    return REPLY_PREFIX[kind] + reply if prefill and isinstance(reply, str) else reply


def _merge_reply(kind: str, group: Sequence[Note], reply: str, stats: MergeStats) -> list[Note]:
    parsed = parse_items(reply, kind)
    stats.malformed_items += parsed.malformed
    if parsed.failed:
        stats.parse_failures += 1
        stats.kept_unmerged += 1
        return list(group)
    if len(parsed.items) > len(group):
        stats.kept_unmerged += 1
        return list(group)
    by_key = {dedupe_key(kind, n.fields): n for n in group}
    union = tuple(dict.fromkeys(s for n in group for s in n.sources))
    out = []
    for fields in parsed.items:
        original = by_key.get(dedupe_key(kind, fields))
        out.append(Note(fields, original.sources if original is not None else union))
    return out


def merge_notes(
    kind: str,
    notes: Sequence[Note],
    generate_fn: GenerateFn,
    *,
    render_fn: RenderFn = render_plain,
    group_size: int = 32,
    max_stale_rounds: int = 3,
    batch_size: int = 8,
    checkpoint: MergeCheckpoint | None = None,
    progress: Callable[[int], None] | None = None,
    prefill: bool = True,
) -> tuple[list[Note], MergeStats]:
    """Merge `notes` of one kind hierarchically (see module docstring). Returns (notes, stats).

    `generate_fn` maps a list of rendered prompts to one reply each; up to `batch_size` group
    prompts go into one call. `progress(n)` is told about each finished group. With `prefill`,
    prompts end with `prompts.REPLY_PREFIX` and replies are read as its continuation.
    """
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {tuple(FIELDS)}, got {kind!r}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if not isinstance(max_stale_rounds, int) or max_stale_rounds < 1:
        raise ValueError(f"max_stale_rounds must be a positive int, got {max_stale_rounds!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    stats = MergeStats(n_in=len(notes))
    current = exact_dedupe(kind, notes)
    stale = 0
    while current:
        groups = [current[i:i + group_size] for i in range(0, len(current), group_size)]
        outputs: list[list[Note] | None] = [None] * len(groups)
        pending: list[int] = []
        for g, group in enumerate(groups):
            if len(group) == 1:
                outputs[g] = list(group)
                continue
            saved = checkpoint.get(kind, stats.rounds, g, group_hash(kind, group)) if checkpoint else None
            if saved is not None:
                outputs[g] = saved
                if progress:
                    progress(1)
            else:
                pending.append(g)
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            prompts = [prompt_with_prefill(render_fn, merge_text(kind, [n.fields for n in groups[g]]), kind, prefill)
                       for g in batch]
            replies = generate_fn(prompts)
            if len(replies) != len(prompts):
                raise ValueError(f"generate_fn returned {len(replies)} replies for {len(prompts)} prompts")
            stats.calls += len(prompts)
            for g, reply in zip(batch, replies):
                merged = _merge_reply(kind, groups[g], full_reply(reply, kind, prefill), stats)
                outputs[g] = merged
                if checkpoint:
                    checkpoint.put(kind, stats.rounds, g, group_hash(kind, groups[g]), merged)
                if progress:
                    progress(1)
        merged_all = exact_dedupe(kind, [n for out in outputs for n in out or ()])
        stats.rounds += 1
        shrank = len(merged_all) < len(current)
        current = merged_all
        if len(groups) == 1:
            break
        stale = 0 if shrank else stale + 1
        if stale >= max_stale_rounds:
            break
        if not shrank:
            # Same grouping would get the same reply again: deal the notes out across groups so
            # that notes which have not met yet share a group in the next round.
            n_groups = -(-len(current) // group_size)
            current = [current[i] for j in range(n_groups) for i in range(j, len(current), n_groups)]
    stats.n_out = len(current)
    return current, stats
