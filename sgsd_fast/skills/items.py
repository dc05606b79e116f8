"""Skill-bank items: the two kinds of notes, their required fields, validation and identity.

A *skill* is a general technique that helped a successful solution; a *mistake* is a general
error pattern seen in a failed one (SPEC §4). Both carry provenance (where the note came from)
and an origin: ``static`` items come from the cold start or a hand-written bank and are never
edited online; ``dynamic`` items are written by online self-evolution and are capped.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

KINDS = ("skill", "mistake")
ORIGINS = ("static", "dynamic")

#: Required text fields per kind, in display order.
FIELDS: dict[str, tuple[str, ...]] = {
    "skill": ("title", "principle", "when_to_apply"),
    "mistake": ("description", "why_it_happens", "how_to_avoid"),
}


def utc_now() -> str:
    """Current time as an ISO-8601 UTC string (the bank's timestamp format)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def check_kind(kind: Any, *, argument: str = "kind") -> str:
    if kind not in KINDS:
        raise ValueError(f"{argument} must be one of {KINDS}, got {kind!r}")
    return kind


def check_origin(origin: Any, *, argument: str = "origin") -> str:
    if origin not in ORIGINS:
        raise ValueError(f"{argument} must be one of {ORIGINS}, got {origin!r}")
    return origin


def clean_fields(kind: str, fields: Mapping[str, Any], *, where: str = "item") -> dict[str, str]:
    """Return the required text fields of `kind`, whitespace-collapsed.

    Raises ValueError naming the first missing, non-string or empty field, so a bad bank file or
    a bad LLM reply is reported instead of being stored half-empty.
    """
    check_kind(kind)
    if not isinstance(fields, Mapping):
        raise TypeError(f"{where}: fields must be a mapping, got {type(fields).__name__}")
    out: dict[str, str] = {}
    for name in FIELDS[kind]:
        if name not in fields:
            raise ValueError(f"{where}: missing required {kind} field {name!r} (required: {FIELDS[kind]})")
        value = fields[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: {kind} field {name!r} must be a string, got {type(value).__name__}")
        value = " ".join(value.split())
        if not value:
            raise ValueError(f"{where}: {kind} field {name!r} is empty")
        out[name] = value
    return out


def normalize_text(text: str) -> str:
    """Case-, width- and punctuation-insensitive form of a text, for exact deduplication."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def dedupe_key(kind: str, fields: Mapping[str, str]) -> str:
    """Two items are duplicates when all their normalized required fields are equal."""
    return kind + "\x1f" + "\x1f".join(normalize_text(fields[name]) for name in FIELDS[kind])


def problem_hash(question: str) -> str:
    """Short stable fingerprint of a problem text, used in provenance (never the text itself)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def make_item_id(kind: str, fields: Mapping[str, str]) -> str:
    """Content-derived id, so the same note gets the same id in every bank and every run."""
    digest = hashlib.sha256(dedupe_key(kind, fields).encode("utf-8")).hexdigest()
    return f"{kind}-{digest[:12]}"


@dataclasses.dataclass(frozen=True)
class SkillItem:
    """One note of a skill bank.

    Attributes:
        id: unique within a bank (content-derived by `SkillItem.new`, or given by an imported file).
        kind: ``"skill"`` or ``"mistake"``.
        fields: the kind's required text fields (`FIELDS`).
        origin: ``"static"`` (cold start / hand-written; never edited online) or ``"dynamic"``.
        provenance: free-form JSON object; writers in this package use the keys ``source``
            (``cold_start`` | ``online`` | ``import`` | ``starter``), ``problem_hashes`` (sha256
            prefixes of the problems the note was derived from), ``outcome`` (``success`` |
            ``failure``), ``step`` (online step) and ``model`` (which model wrote it).
        created, updated: ISO-8601 UTC timestamps.
        extra: keys of an imported item that the bank does not interpret, kept for round trips.
    """

    id: str
    kind: str
    fields: Mapping[str, str]
    origin: str = "static"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    created: str = ""
    updated: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def new(
        cls,
        kind: str,
        fields: Mapping[str, Any],
        *,
        origin: str = "static",
        provenance: Mapping[str, Any] | None = None,
        item_id: str | None = None,
    ) -> SkillItem:
        """Validated item with a content-derived id (unless given) and fresh timestamps."""
        cleaned = clean_fields(kind, fields)
        check_origin(origin)
        now = utc_now()
        return cls(
            id=item_id or make_item_id(kind, cleaned),
            kind=kind,
            fields=cleaned,
            origin=origin,
            provenance=dict(provenance or {}),
            created=now,
            updated=now,
        )

    @property
    def text(self) -> str:
        """The text that retrieval embeds: all required fields in display order (SPEC §4)."""
        return " ".join(self.fields[name] for name in FIELDS[self.kind])

    @property
    def key(self) -> str:
        """Exact-deduplication key (normalized text of all required fields)."""
        return dedupe_key(self.kind, self.fields)

    def to_record(self) -> dict[str, Any]:
        """Flat JSON object: id, the text fields, origin, provenance, timestamps, then extras."""
        record: dict[str, Any] = {"id": self.id, **self.fields, "origin": self.origin,
                                  "provenance": dict(self.provenance), "created": self.created,
                                  "updated": self.updated}
        for name, value in self.extra.items():
            record.setdefault(name, value)
        return record

    @classmethod
    def from_record(cls, kind: str, record: Mapping[str, Any], *, default_origin: str = "static",
                    where: str = "item") -> SkillItem:
        """Inverse of `to_record`. Required text fields are strict; everything else is optional."""
        if not isinstance(record, Mapping):
            raise TypeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        fields = clean_fields(kind, record, where=where)
        origin = record.get("origin", default_origin)
        check_origin(origin, argument=f"{where}: origin")
        provenance = record.get("provenance", {}) or {}
        if not isinstance(provenance, Mapping):
            raise ValueError(f"{where}: provenance must be a JSON object, got {type(provenance).__name__}")
        item_id = record.get("id") or make_item_id(kind, fields)
        if not isinstance(item_id, str):
            raise ValueError(f"{where}: id must be a string, got {type(item_id).__name__}")
        now = utc_now()
        created = record.get("created") or now
        updated = record.get("updated") or created
        for name, value in (("created", created), ("updated", updated)):
            if not isinstance(value, str):
                raise ValueError(f"{where}: {name} must be an ISO-8601 string, got {type(value).__name__}")
        known = set(FIELDS[kind]) | {"id", "origin", "provenance", "created", "updated", "kind"}
        extra = {k: v for k, v in record.items() if k not in known}
        return cls(id=item_id, kind=kind, fields=fields, origin=origin, provenance=dict(provenance),
                   created=created, updated=updated, extra=extra)
