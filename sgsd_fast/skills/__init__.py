"""The skill bank: storage, encoders, retrieval of teacher contexts, cold start and online evolution.

See SPEC §4. Public names: docs/ARCHITECTURE.md ("Interfaces between the layers").
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .builder import BuildSummary, build_bank
from .encoders import Encoder, make_encoder
from .evolve import OnlineEvolver
from .items import FIELDS, KINDS, ORIGINS, SkillItem
from .retrieval import Retriever, TeacherContext
from .store import BankDiff, ImportReport, SkillBank, VersionInfo


def starter_bank_path() -> Path:
    """Path of the bundled hand-written starter bank (JSON exchange format; import it as static)."""
    return Path(str(resources.files("sgsd_fast.skills") / "data" / "starter_bank.json"))


__all__ = [
    "FIELDS", "KINDS", "ORIGINS", "BankDiff", "BuildSummary", "Encoder", "ImportReport", "OnlineEvolver",
    "Retriever", "SkillBank", "SkillItem", "TeacherContext", "VersionInfo", "build_bank", "make_encoder",
    "starter_bank_path",
]
