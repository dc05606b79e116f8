"""Verification in worker processes with a hard per-item timeout.

math-verify can hang on pathological inputs and its own timeouts rely on ``signal.alarm``, which
only works on a process's main thread. Each check therefore runs on the main thread of a
separate *spawned* process (forking a process that already runs torch threads is unsafe). The
answer extraction runs there too, inside the same timeout: a completion is untrusted text, and no
amount of it may stall the trainer's process. An item that exceeds `timeout_s` gets its worker
killed and replaced; a check that raises, or a worker that dies, yields reward 0 and is counted.
`Verifier.score` never waits much longer than ``timeout_s`` past the slowest running item.

A small purpose-built pool is used instead of `concurrent.futures.ProcessPoolExecutor` because
the executor cannot kill a single hung worker: killing one breaks the whole executor and every
other in-flight item with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sgsd_fast.verify.extract import answers_match, extract_answer

__all__ = ["Verifier", "VerifyResult"]

Check = Callable[[str, str], bool]

# A fresh worker must import math-verify/sympy before it reports ready; on a loaded machine that
# can take a while, and it is not charged to any item's timeout.
_STARTUP_TIMEOUT_S = 120.0
_JOIN_TIMEOUT_S = 2.0


@dataclass
class VerifyResult:
    """Outcome of one `Verifier.score` call.

    rewards: 1.0 / 0.0 per completion. extracted: the extracted answer (None when the completion
    states none, or when its item timed out or crashed before the extraction finished).
    timeouts / errors: items that exceeded the timeout / raised or crashed their worker (both
    score 0).
    """

    rewards: list[float]
    extracted: list[str | None]
    timeouts: int = 0
    errors: int = 0

    @property
    def accuracy(self) -> float:
        """Mean reward (0.0 for an empty batch)."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0


def _worker_main(conn: Connection, check: Check, answer_phrase: bool) -> None:
    """Worker loop: announce readiness, then answer ``(index, completion, gold)`` requests until None.

    Each request gets two messages: the extracted answer first (so it is known even when the check
    then hangs), then the verdict (False without calling `check` when there is no answer).
    """
    # Import the heavy parser before announcing readiness so no item pays for it.
    import math_verify  # noqa: F401

    conn.send(("ready", None, None))
    while True:
        request = conn.recv()
        if request is None:
            # A spawned child ends with sys.exit, whose interpreter teardown of sympy's module
            # graph takes seconds; the worker holds no state, so skip it.
            conn.close()
            os._exit(0)
        index, completion, gold = request
        try:
            pred = extract_answer(completion, answer_phrase=answer_phrase)
            conn.send(("extracted", index, pred))
            conn.send(("ok", index, pred is not None and bool(check(pred, gold))))
        except Exception as exc:  # any failure of a check is an error outcome, reported back
            conn.send(("error", index, f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, context: Any, check: Check, answer_phrase: bool) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, check, answer_phrase), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.started_at = time.monotonic()
        self.task: tuple[int, float] | None = None  # (item index, deadline)

    def send(self, index: int, completion: str, gold: str, timeout_s: float) -> None:
        self.conn.send((index, completion, gold))
        self.task = (index, time.monotonic() + timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(_JOIN_TIMEOUT_S)
        self.conn.close()

    def request_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:  # already dead: nothing to ask
            pass

    def join_or_kill(self, deadline: float) -> None:
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_JOIN_TIMEOUT_S)
        self.conn.close()


class Verifier:
    """Scores completions against ground-truth answers in `num_workers` spawned processes.

    Args:
        num_workers: worker processes (started lazily on the first `score`, kept alive after).
        timeout_s: per-item limit (answer extraction plus check), measured from when the item
            reaches a ready worker.
        check: ``check(pred, gold) -> bool`` run in the workers on each extracted answer; must be
            picklable (a module-level function). Defaults to `answers_match`; tests inject slow or
            crashing checks here.
        answer_phrase: also accept an "answer is ..." phrase when there is no box or
            ``Answer:`` line (see `extract_answer`; off by default, as in SPEC §5).

    Use as a context manager or call `close()` to stop the workers.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *, check: Check = answers_match,
                 answer_phrase: bool = False) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not callable(check):
            raise TypeError(f"check must be callable, got {type(check).__name__}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._check = check
        self.answer_phrase = bool(answer_phrase)
        self._context = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._closed = False

    # -- worker management ---------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self._check, self.answer_phrase)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def _ensure_workers(self) -> None:
        if self._closed:
            raise RuntimeError("Verifier is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    # -- scoring ---------------------------------------------------------------------------------

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        """Reward 1.0 for each completion whose extracted answer matches its ground truth."""
        if isinstance(completions, str) or isinstance(answers, str):
            raise TypeError("completions and answers must be sequences of str, not a single str")
        if len(completions) != len(answers):
            raise ValueError(f"completions ({len(completions)}) and answers ({len(answers)}) must have the same length")
        for name, values in (("completions", completions), ("answers", answers)):
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")

        result = VerifyResult(rewards=[0.0] * len(completions), extracted=[None] * len(completions))
        pending = deque(zip(range(len(completions)), completions, answers))
        if pending:
            self._ensure_workers()
            try:
                self._run(pending, result)
            except BaseException:
                # Items still in flight would answer into the next call: drop these workers.
                self._kill_all()
                raise
        return result

    def _run(self, pending: deque[tuple[int, str, str]], result: VerifyResult) -> None:
        outstanding = len(pending)
        while outstanding:
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    item = pending.popleft()
                    try:
                        worker.send(*item, self.timeout_s)
                    except OSError:  # died while idle: retry the item on a fresh worker
                        pending.appendleft(item)
                        self._replace(worker)
            now = time.monotonic()
            deadlines = [w.task[1] for w in self._workers if w.task is not None]
            deadlines += [w.started_at + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - now)
            ready_conns = set(wait([w.conn for w in self._workers], timeout=wait_s))

            for worker in list(self._workers):
                if worker.conn in ready_conns:
                    outstanding -= self._receive(worker, result)
                elif worker.task is not None and time.monotonic() >= worker.task[1]:
                    result.timeouts += 1
                    outstanding -= 1
                    self._replace(worker)
                elif not worker.ready and time.monotonic() >= worker.started_at + _STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"a verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")

    def _receive(self, worker: _Worker, result: VerifyResult) -> int:
        """Handle one message from `worker`; returns how many items it settled (0 or 1)."""
        try:
            kind, index, payload = worker.conn.recv()
        except (EOFError, OSError):
            # The worker died. While starting, that means a broken environment, which must not
            # turn into an endless respawn loop; otherwise its item (if any) is an error.
            if not worker.ready:
                raise RuntimeError("a verifier worker exited while starting (is math-verify importable? A script "
                                   "that creates a Verifier needs an `if __name__ == '__main__':` guard, "
                                   "since workers are spawned)") from None
            settled = 0 if worker.task is None else 1
            result.errors += settled
            self._replace(worker)
            return settled
        if kind == "ready":
            worker.ready = True
            return 0
        if kind == "extracted":
            result.extracted[index] = payload
            return 0
        worker.task = None
        if kind == "ok":
            result.rewards[index] = 1.0 if payload else 0.0
        else:
            result.errors += 1
        return 1

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker processes (idempotent). Workers are stateless, so stragglers are killed."""
        for worker in self._workers:
            worker.request_stop()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for worker in self._workers:
            worker.join_or_kill(deadline)
        self._workers = []
        self._closed = True

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only: at interpreter shutdown the modules close() needs may already be gone.
        with contextlib.suppress(Exception):
            if getattr(self, "_workers", None):
                self.close()
