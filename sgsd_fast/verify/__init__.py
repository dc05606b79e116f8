"""Binary verifier: answer extraction, math-verify comparison, and a timeout-safe process pool."""

from sgsd_fast.verify.extract import answers_match, extract_answer, normalize_answer
from sgsd_fast.verify.pool import Verifier, VerifyResult

__all__ = ["Verifier", "VerifyResult", "answers_match", "extract_answer", "normalize_answer"]
