"""Helper for tests/test_trainer.py: a verifier check that never returns in time.

It lives in its own light module because the verifier runs checks in spawned worker processes,
which import the check's module by name: importing this one costs nothing, importing
test_trainer.py would load torch and transformers in every worker. (No tests here.)
"""
import time


def hang_check(pred: str, gold: str) -> bool:
    time.sleep(60)
    return True
