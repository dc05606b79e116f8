"""Reading notes out of free-form LLM replies, robustly.

Accepted shapes (anywhere in the reply, possibly inside a ```json fence, possibly with prose
around it): a JSON list of objects; an object holding such a list under any key (e.g.
``{"skills": [...]}``); or standalone objects with the kind's fields. The first list-shaped
JSON value wins; failing that, every standalone item object is taken — so a list cut off by the
length limit still yields its complete elements, and an element cut off after its last required
field (a model adding an extra key) is closed after its last complete member. Elements without every required field as a
non-empty string are counted as malformed and dropped; a reply with no usable JSON at all is a
parse failure. Nothing here raises on bad model output.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from .items import FIELDS, clean_fields

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


@dataclasses.dataclass
class ParseResult:
    """Valid items (cleaned field dicts); elements dropped as malformed; valid elements beyond
    `max_items` that were not kept (excess); whether the reply yielded nothing usable (failed)."""

    items: list[dict[str, str]]
    malformed: int = 0
    excess: int = 0
    failed: bool = False


#: How many cut points `_repair_object` tries per unterminated object (bounds the work on prose).
_MAX_REPAIRS = 24


def _repair_object(text: str, start: int) -> tuple[Any, int] | None:
    """An object cut off by the length limit, closed after its last complete member.

    Tries the commas after `start` from the last one backwards: ``text[start:comma] + "}"``. The
    members before the cut are exactly as the model wrote them; only the unfinished tail is lost.
    """
    commas = [m.start() for m in re.finditer(",", text[start:start + 8000])]
    for offset in reversed(commas[-_MAX_REPAIRS:]):
        try:
            value = json.loads(text[start:start + offset] + "}")
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value, start + offset
    return None


def _json_values(text: str):
    """Yield every JSON value that starts at a '[' or '{' in text, scanning left to right
    (objects cut off by the length limit are closed after their last complete member)."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        starts = [i for i in (text.find("[", pos), text.find("{", pos)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            repaired = _repair_object(text, start) if text[start] == "{" else None
            if repaired is None:
                pos = start + 1
                continue
            value, end = repaired
        yield value
        pos = end


def _container_list(value: Any, kind: str) -> list | None:
    """The list of elements if `value` is a list of objects or an object holding one."""
    if isinstance(value, list):
        return value if any(isinstance(v, Mapping) for v in value) else None
    if isinstance(value, Mapping) and not _is_item(value, kind):
        for inner in value.values():
            if isinstance(inner, list) and any(isinstance(v, Mapping) for v in inner):
                return inner
    return None


def _is_item(value: Any, kind: str) -> bool:
    return isinstance(value, Mapping) and any(name in value for name in FIELDS[kind])


def _elements(source: str, kind: str) -> list | None:
    """Elements of the first list-shaped JSON value, else every standalone item object (which
    also salvages the complete elements of a list cut off by the length limit)."""
    standalone: list = []
    for value in _json_values(source):
        if _is_item(value, kind):
            standalone.append(value)
            continue
        elements = _container_list(value, kind)
        if elements is not None and not standalone:
            return elements
    return standalone or None


def parse_items(text: Any, kind: str, *, max_items: int | None = None) -> ParseResult:
    """Items of `kind` found in an LLM reply (see the module docstring); at most `max_items`."""
    if not isinstance(text, str):
        return ParseResult([], failed=True)
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for source in sources:
        elements = _elements(source, kind)
        if elements is None:
            continue
        items, malformed = [], 0
        for element in elements:
            try:
                items.append(clean_fields(kind, element))
            except (TypeError, ValueError):
                malformed += 1
        excess = 0
        if max_items is not None and len(items) > max_items:
            excess, items = len(items) - max_items, items[:max_items]
        return ParseResult(items, malformed, excess, failed=not items)
    return ParseResult([], failed=True)
