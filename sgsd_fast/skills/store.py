"""The skill bank: one SQLite file, transactional updates, a full snapshot per version.

Storage model
-------------
* ``items`` holds the current notes; ``versions`` holds, per bank version, a JSON snapshot of
  every item as of that version (banks are small, so full snapshots are cheap and make
  ``items(version=V)`` and ``diff(V1, V2)`` trivial and exact).
* Every change goes through `SkillBank.transaction`: one ``BEGIN IMMEDIATE`` … ``COMMIT`` that
  applies the changes *and* writes the next version row. The database runs in WAL mode with
  ``synchronous=FULL``, so a reader (another process, the trainer's retriever) only ever sees
  committed versions, and a writer killed mid-update leaves the previous version intact: SQLite
  discards the uncommitted frames when the file is next opened.
* Version 0 is the empty bank before its first update.

JSON exchange format (`SkillBank.export_json` / `SkillBank.import_json`)::

    {
      "format": "sgsd-fast-skill-bank",        # optional on import
      "version": 3,                             # optional; the exporting bank's version (informational)
      "skills": [                               # optional if "mistakes" is present
        {"id": "skill-1a2b3c4d5e6f",            # optional: derived from the text when absent
         "title": "...", "principle": "...", "when_to_apply": "...",    # required, non-empty strings
         "origin": "static" | "dynamic",        # optional: the importer's default_origin
         "provenance": {...},                   # optional JSON object
         "created": "ISO-8601", "updated": "ISO-8601",                 # optional
         ...}                                   # other keys are kept verbatim and exported again
      ],
      "mistakes": [
        {"id": "...", "description": "...", "why_it_happens": "...", "how_to_avoid": "...", ...}
      ]
    }
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .items import KINDS, SkillItem, check_kind, check_origin, clean_fields, utc_now

FORMAT_NAME = "sgsd-fast-skill-bank"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('skill', 'mistake')),
    origin TEXT NOT NULL CHECK (origin IN ('static', 'dynamic')),
    dedupe_key TEXT NOT NULL UNIQUE,
    fields TEXT NOT NULL,
    provenance TEXT NOT NULL,
    extra TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    message TEXT NOT NULL,
    n_skills INTEGER NOT NULL,
    n_mistakes INTEGER NOT NULL,
    snapshot TEXT NOT NULL
);
"""


@functools.cache
def _schema_columns() -> dict[str, frozenset[str]]:
    """Columns of every bank table, read from `_SCHEMA` itself so the check cannot drift from it."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if not row[0].startswith("sqlite_")]
        return {t: frozenset(row[1] for row in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        conn.close()


def remove_bank_files(path: str | os.PathLike[str]) -> None:
    """Delete a bank file and SQLite's companion files (``-wal``, ``-shm``, ``-journal``)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    version: int
    created: str
    message: str
    n_skills: int
    n_mistakes: int


@dataclasses.dataclass(frozen=True)
class BankDiff:
    """Items added, removed and changed (same id, different content) from one version to another."""

    old_version: int
    new_version: int
    added: list[SkillItem]
    removed: list[SkillItem]
    changed: list[tuple[SkillItem, SkillItem]]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """Outcome of `SkillBank.import_json`: what was added and what was skipped, and why."""

    version: int
    added: int
    skipped: list[tuple[str, str]]  # (item id, reason)


def _row_to_item(row: sqlite3.Row) -> SkillItem:
    return SkillItem(
        id=row["id"], kind=row["kind"], fields=json.loads(row["fields"]), origin=row["origin"],
        provenance=json.loads(row["provenance"]), created=row["created"], updated=row["updated"],
        extra=json.loads(row["extra"]),
    )


class BankTransaction:
    """Changes made inside `SkillBank.transaction`; they become visible together on commit."""

    def __init__(self, bank: SkillBank) -> None:
        self._bank = bank

    def items(self, kind: str | None = None, *, origin: str | None = None) -> list[SkillItem]:
        """Items as seen inside this transaction (including its own uncommitted changes)."""
        return self._bank._select_items(kind, origin)

    def add(self, item: SkillItem) -> None:
        """Insert `item`. ValueError if its id or its normalized text is already in the bank."""
        if not isinstance(item, SkillItem):
            raise TypeError(f"item must be a SkillItem, got {type(item).__name__}")
        check_kind(item.kind, argument="item.kind")
        check_origin(item.origin, argument="item.origin")
        clean_fields(item.kind, item.fields, where=f"item {item.id!r}")  # a hand-built SkillItem is checked too
        if not isinstance(item.id, str) or not item.id:
            raise ValueError(f"item.id must be a non-empty string, got {item.id!r}")
        try:
            self._bank._conn.execute(
                "INSERT INTO items (id, kind, origin, dedupe_key, fields, provenance, extra, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.id, item.kind, item.origin, item.key, json.dumps(dict(item.fields)),
                 json.dumps(dict(item.provenance)), json.dumps(dict(item.extra)),
                 item.created or utc_now(), item.updated or item.created or utc_now()),
            )
        except sqlite3.IntegrityError as err:
            raise ValueError(f"item {item.id!r} duplicates an item already in the bank (same id or same text)") from err

    def remove(self, item_id: str) -> SkillItem:
        """Delete the item with this id and return it; KeyError if absent."""
        row = self._bank._conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id!r} in the bank")
        self._bank._conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
        return _row_to_item(row)

    def _execute(self, sql: str, params: tuple | list = ()) -> sqlite3.Cursor:
        """Package-internal: write bookkeeping rows that must commit together with this version."""
        return self._bank._conn.execute(sql, params)

    def contains_key(self, key: str) -> bool:
        """True when an item with this dedupe key (`SkillItem.key`) is in the bank."""
        return self._bank._conn.execute("SELECT 1 FROM items WHERE dedupe_key = ?", (key,)).fetchone() is not None


class SkillBank:
    """A skill bank stored in one SQLite file.

    Args:
        path: the bank file; created (with parent folders) when absent unless ``create=False``.
        create: when False, a missing file is a FileNotFoundError.
        read_only: open the file with SQLite's ``mode=ro``: nothing in it can be changed (no
            schema, no journal-mode switch), which is what inspection commands need; implies
            ``create=False``.

    An existing file must be a bank (its tables, columns and format marker are checked) or the
    constructor raises ValueError naming it; only a new or empty file gets the schema. So a
    mistyped path to some other SQLite database is refused, never written into.

    The object is safe to share between threads (one lock serializes its connection); several
    processes may open the same file (SQLite locking; readers never block on a writer in WAL).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, read_only: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = Path(path)
        self.read_only = bool(read_only)
        if not self.path.exists():
            if read_only or not create:
                raise FileNotFoundError(f"skill bank {str(self.path)!r} does not exist")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise IsADirectoryError(f"skill bank {str(self.path)!r} is a directory, not a bank file")
        self._lock = threading.RLock()
        self._in_transaction = False
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so one update is exactly one transaction.
        target, uri = (f"{self.path.resolve().as_uri()}?mode=ro", True) if self.read_only else (str(self.path), False)
        self._conn = sqlite3.connect(target, uri=uri, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            self._open()
        except sqlite3.DatabaseError as err:  # "file is not a database", corruption: SQLite names no file
            self._conn.close()
            raise ValueError(f"skill bank {str(self.path)!r} cannot be read: {err}") from err
        except BaseException:
            self._conn.close()
            raise

    def _open(self) -> None:
        """Create the schema in a new (empty) file, check an existing one, then set the pragmas.

        The check comes before any pragma that writes (the WAL switch), so a refused file is left
        exactly as it was.
        """
        self._conn.execute("PRAGMA foreign_keys=ON")
        has_tables = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone()
        if not has_tables and not self.read_only:
            self._create_schema()
        self._check_schema()
        if not self.read_only:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")

    def _check_schema(self) -> None:
        where = f"{str(self.path)!r} is not an sgsd-fast skill bank"
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, columns in _schema_columns().items():
            if table not in tables:
                raise ValueError(f"{where} (no {table!r} table)")
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if not columns <= present:
                raise ValueError(f"{where} (table {table!r} lacks columns {sorted(columns - present)})")
        meta = {row[0]: row[1] for row in self._conn.execute("SELECT key, value FROM meta")}
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{where} (format marker {meta.get('format')!r})")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ValueError(f"skill bank {str(self.path)!r} has schema version {meta.get('schema_version')!r}; "
                             f"this sgsd-fast reads version {SCHEMA_VERSION}")

    def _create_schema(self) -> None:
        # Only for a new file: opening an existing bank must never wait for a writer's lock.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT_NAME,))
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SkillBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SkillBank({str(self.path)!r}, version={self.version})"

    # ------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        """The latest committed version (0 for a bank that was never updated)."""
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()
        return int(row[0])

    def _select_items(self, kind: str | None, origin: str | None) -> list[SkillItem]:
        sql, params = "SELECT * FROM items", []
        clauses = []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(check_kind(kind))
        if origin is not None:
            clauses.append("origin = ?")
            params.append(check_origin(origin))
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [_row_to_item(row) for row in rows]

    def items(self, kind: str | None = None, *, origin: str | None = None,
              version: int | None = None) -> list[SkillItem]:
        """Items in insertion order, optionally filtered by kind/origin, now or as of `version`."""
        if version is None:
            return self._select_items(kind, origin)
        snapshot = self._snapshot(version)
        if kind is not None:
            check_kind(kind)
        if origin is not None:
            check_origin(origin)
        return [item for item in snapshot
                if (kind is None or item.kind == kind) and (origin is None or item.origin == origin)]

    def get(self, item_id: str) -> SkillItem:
        with self._lock:
            row = self._conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id!r} in the bank")
        return _row_to_item(row)

    def count(self, kind: str | None = None, *, origin: str | None = None) -> int:
        return len(self._select_items(kind, origin))

    def versions(self) -> list[VersionInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT version, created, message, n_skills, n_mistakes FROM versions ORDER BY version").fetchall()
        return [VersionInfo(*tuple(row)) for row in rows]

    def _snapshot(self, version: int) -> list[SkillItem]:
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version must be a non-negative int, got {version!r}")
        if version == 0:
            return []
        with self._lock:
            row = self._conn.execute("SELECT snapshot FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise ValueError(f"version {version} does not exist in {str(self.path)!r} (latest is {self.version})")
        records = json.loads(row[0])
        return [SkillItem.from_record(r["kind"], {k: v for k, v in r.items() if k != "kind"}) for r in records]

    def diff(self, old_version: int, new_version: int) -> BankDiff:
        """What changed between two versions (either order; 0 is the empty bank)."""
        old = {item.id: item for item in self._snapshot(old_version)}
        new = {item.id: item for item in self._snapshot(new_version)}
        added = [item for item_id, item in new.items() if item_id not in old]
        removed = [item for item_id, item in old.items() if item_id not in new]
        changed = [(old[i], new[i]) for i in new if i in old and old[i] != new[i]]
        return BankDiff(old_version, new_version, added, removed, changed)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def transaction(self, message: str) -> Iterator[BankTransaction]:
        """One atomic update that ends in a new version.

        Everything done with the yielded `BankTransaction` commits together with a snapshot row
        for version ``self.version + 1``; an exception inside the block rolls all of it back.
        """
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string describing the update")
        with self._immediate("SkillBank.transaction"):
            yield BankTransaction(self)
            self._write_version(message)

    def _write_version(self, message: str) -> int:
        items = self._select_items(None, None)
        version = int(self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0]) + 1
        snapshot = json.dumps([{"kind": item.kind, **item.to_record()} for item in items])
        n_skills = sum(item.kind == "skill" for item in items)
        self._conn.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                           (version, utc_now(), message, n_skills, len(items) - n_skills, snapshot))
        return version

    @contextlib.contextmanager
    def state_transaction(self) -> Iterator[sqlite3.Connection]:
        """A raw transaction for package-internal bookkeeping tables (e.g. the cold-start builder's
        resume state). It does not create a bank version; never write ``items`` through it."""
        with self._immediate("state_transaction") as conn:
            yield conn

    @contextlib.contextmanager
    def _immediate(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT around the block, ROLLBACK on any exception; not nestable."""
        with self._lock:
            if self.read_only:
                raise RuntimeError(f"{what}: skill bank {str(self.path)!r} was opened read-only")
            if self._in_transaction:
                raise RuntimeError(f"{what} cannot be nested in another transaction")
            self._in_transaction = True
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._in_transaction = False

    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        """Read-only query on the bank file (package-internal bookkeeping tables)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def backup(self, path: str | os.PathLike[str]) -> Path:
        """Copy the whole bank (items, versions, bookkeeping) to a new file, consistently, even
        while other connections are writing (SQLite's online backup API)."""
        target_path = Path(path)
        if target_path.resolve() == self.path.resolve():
            raise ValueError("backup path must differ from the bank's own path")
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(str(target_path))
        try:
            with self._lock:
                self._conn.backup(target)
        finally:
            target.close()
        return target_path

    # ------------------------------------------------------------------ exchange
    def export_json(self, path: str | os.PathLike[str] | None = None, *, version: int | None = None) -> dict[str, Any]:
        """The bank (now, or as of `version`) in the JSON exchange format; also written to `path`."""
        items = self.items(version=version)
        data = {
            "format": FORMAT_NAME,
            "version": self.version if version is None else version,
            "skills": [item.to_record() for item in items if item.kind == "skill"],
            "mistakes": [item.to_record() for item in items if item.kind == "mistake"],
        }
        if path is not None:
            target = Path(path)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, target)  # never leave a half-written export behind
        return data

    def import_json(self, source: str | os.PathLike[str] | Mapping[str, Any], *, default_origin: str = "static",
                    replace: bool = False, message: str | None = None) -> ImportReport:
        """Add the items of a JSON bank (file path or already-parsed object) as one new version.

        The whole file is validated before anything is written: a missing or empty required
        field anywhere is a ValueError naming the list, the index and the field. Items whose id
        or normalized text is already in the bank (or earlier in the same file) are skipped and
        listed in the report. ``replace=True`` first removes every current item.
        """
        check_origin(default_origin, argument="default_origin")
        if isinstance(source, Mapping):
            data, where = source, "bank JSON"
        elif isinstance(source, (str, os.PathLike)):
            where = str(source)
            try:
                data = json.loads(Path(source).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
        else:
            raise TypeError(f"source must be a path or a mapping, got {type(source).__name__}")
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: the top level must be a JSON object with 'skills' and/or 'mistakes' lists")
        if "skills" not in data and "mistakes" not in data:
            raise ValueError(f"{where}: expected a 'skills' and/or a 'mistakes' list at the top level")
        parsed: list[SkillItem] = []
        for kind, key in (("skill", "skills"), ("mistake", "mistakes")):
            records = data.get(key, [])
            if not isinstance(records, list):
                raise ValueError(f"{where}: {key!r} must be a list, got {type(records).__name__}")
            for index, record in enumerate(records):
                parsed.append(SkillItem.from_record(kind, record, default_origin=default_origin,
                                                    where=f"{where}: {key}[{index}]"))
        skipped: list[tuple[str, str]] = []
        added = 0
        with self.transaction(message or f"import {len(parsed)} items from {Path(where).name}") as tx:
            if replace:
                for item in tx.items():
                    tx.remove(item.id)
            seen_ids = {item.id for item in tx.items()}
            for item in parsed:
                if item.id in seen_ids:
                    skipped.append((item.id, "id already present"))
                elif tx.contains_key(item.key):
                    skipped.append((item.id, "same text as an item already present"))
                else:
                    tx.add(item)
                    seen_ids.add(item.id)
                    added += 1
        return ImportReport(version=self.version, added=added, skipped=skipped)


def kind_counts(items: list[SkillItem]) -> dict[str, int]:
    """Number of items per kind (every kind present, possibly 0)."""
    return {kind: sum(item.kind == kind for item in items) for kind in KINDS}


__all__ = ["BankDiff", "BankTransaction", "FORMAT_NAME", "ImportReport", "SkillBank", "VersionInfo",
           "kind_counts", "remove_bank_files"]
