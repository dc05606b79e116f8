"""Data-parallel training (gloo, CPU, 2 processes) equals one process on the same global batch.

One spawn of two ranks runs SGSD, OPSD and GRPO one after the other (a spawn costs ~10 s of
imports on the 2-core CI machine, so the three methods share it); the same three runs in this
process are the reference. Both sides sample with rollout_seeding='problem', so the rollouts,
rewards and token counts must be identical, and they are compared exactly.

The loss, gradient norm and weights may differ only by the order of float32 sums (each rank
accumulates its half of the batch, gloo adds the halves, micro-batches hold other rows and so
other padding widths). How large that is cannot be stated a priori here: the tiny model's SGSD loss
is ~1e-7, a difference of large cancelling terms, and AdamW's first update lr * m / sqrt(v) turns a
near-zero gradient entry's rounding into a visible weight change. So the tolerance is measured: a
control run in this process changes nothing but the reduction order (micro_batch_size 1 instead of
3, no second process), and the 2-process run must be within 10x the control's difference (plus
1e-5 relative, ~100 float32 ulps, for the case where the control lands on the same value; weights:
10x the control's largest difference over all tensors, plus 1e-6). Measured here: control grad-norm differences up to 3e-5 relative and weight
differences up to 4.5e-5, the 2-process run's up to 1.7e-5. A real error is outside: AdamW is
scale-invariant, so a wrong normalizer (a factor of world_size) barely moves the weights, but it
moves the logged loss and gradient norm by that factor.

Resume: continuing the 2-process SGSD run from its step-1 checkpoint (in process, and after a
rank was killed with SIGKILL mid-step and both were relaunched) is compared bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from sgsd_fast.config import TrainConfig
from sgsd_fast.train.checkpoint import resolve_resume
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.distributed import Distributed, LaunchEnv, rank_device
from sgsd_fast.train.metrics import read_metrics
from sgsd_fast.train.trainer import Trainer
from sgsd_fast.verify import VerifyResult

METHODS = ("sgsd", "opsd", "grpo")
WORLD = 2


class ParityVerifier:
    """Reward from the completion's text alone (so it does not depend on which rank scores it)."""

    def score(self, completions, answers) -> VerifyResult:
        return VerifyResult(rewards=[float(sum(map(ord, c)) % 2) for c in completions],
                            extracted=[None] * len(completions))

    def close(self) -> None:
        pass


def bank(path: Path) -> Path:
    skills = [{"title": f"Skill {i}", "principle": f"Add the {w} numbers carefully.", "when_to_apply": "Sums."}
              for i, w in enumerate(["small", "large"])]
    mistakes = [{"description": f"Mistake {i}", "why_it_happens": f"Rushing {w} sums.",
                 "how_to_avoid": "Check the digits."} for i, w in enumerate(["small", "large"])]
    path.write_text(json.dumps({"format": "sgsd-fast-skill-bank", "version": 1, "skills": skills,
                                "mistakes": mistakes}))
    return path


def make_cfg(run_dir: Path, bank_file: Path, method: str, **kw) -> TrainConfig:
    base = dict(method=method, max_steps=2, prompts_per_step=4, num_generations=2, max_new_tokens=6, num_teachers=2,
                micro_batch_size=3, teacher_micro_batch_size=3, generation_batch_size=8, num_train_problems=16,
                num_eval_problems=2, builtin_levels=[1], output_dir=str(run_dir), skill_bank=str(bank_file),
                save_every=1, learning_rate=1e-2, deadzone=0.0, warmup_steps=0, progress=False, report_to="none",
                use_peft=False, optim="adamw_torch", sgsd_outcome="advantage", eval_at_start=False,
                teacher_params="frozen" if method == "opsd" else "live", rollout_seeding="problem",
                log_completions=100)
    base.update(kw)
    return TrainConfig(**base)


def run_methods(root: Path, bank_file: Path, dist: Distributed | None, **kw) -> dict[str, dict]:
    """Train each method from the same tiny model; its final weights (the metrics are in root/<method>)."""
    tok = tiny_tokenizer()
    out = {}
    for method in METHODS:
        model = tiny_random_model(tok, hidden_size=32, layers=2, seed=1)
        cfg = make_cfg(root / method, bank_file, method, **kw)
        with Trainer(cfg, model=model, tokenizer=tok, verifier=ParityVerifier(), log=lambda s: None,
                     dist=dist) as trainer:
            trainer.train()
        out[method] = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return out


def resume_sgsd(root: Path, bank_file: Path, dist: Distributed) -> dict[str, torch.Tensor]:
    """Continue the SGSD run from its step-1 checkpoint in a new run directory; the final weights."""
    tok = tiny_tokenizer()
    model = tiny_random_model(tok, hidden_size=32, layers=2, seed=2)  # other weights: the checkpoint must win
    with Trainer(make_cfg(root / "resumed", bank_file, "sgsd"), model=model, tokenizer=tok, verifier=ParityVerifier(),
                 log=lambda s: None, dist=dist, resume=root / "sgsd" / "checkpoint-1") as trainer:
        trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def join_group(rank: int, port: int) -> Distributed:
    """A spawned rank's process group (gloo on 127.0.0.1:port, one torch thread) and its `Distributed`."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    return Distributed(LaunchEnv(WORLD, rank, rank))


def _worker(rank: int, port: int, root: str, bank_file: str) -> None:
    dist = join_group(rank, port)
    try:
        result = run_methods(Path(root), Path(bank_file), dist)
        result["resumed"] = resume_sgsd(Path(root), Path(bank_file), dist)
        torch.save(result, Path(root) / f"result-rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, control results, [rank 0, rank 1] results, their root)."""
    root = tmp_path_factory.mktemp("dist")
    bank_file = bank(root / "bank.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_methods(root / "one", bank_file, None)
        control = run_methods(root / "control", bank_file, None, micro_batch_size=1)
    finally:
        torch.set_num_threads(threads)
    (root / "two").mkdir()
    mp.spawn(_worker, args=(free_port(), str(root / "two"), str(bank_file)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / "two" / f"result-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, control, ranks, root


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_step" not in r]


def logged(rows: list[dict]) -> list[dict]:
    """Metrics rows without timings and memory, the only values that differ between two equal runs."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "peak_memory_mb"} for r in rows]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process(runs, method):
    single, control, ranks, root = runs
    one, ctl, two = (train_rows(root / name / method) for name in ("one", "control", "two"))
    assert [r["step"] for r in two] == [1, 2]
    for a, c, b in zip(one, ctl, two):
        # the same rollouts, rewards and token counts: exact
        for key in ("reward", "mask_tokens", "completion_length/mean", "completion_length/max", "skipped"):
            assert a[key] == b[key] == c[key], key
        for key in ("loss", "grad_norm"):
            assert abs(b[key] - a[key]) <= 10 * abs(c[key] - a[key]) + 1e-5 * abs(a[key]), (key, a, b, c)
    # the logged completions (the whole batch, gathered) are identical
    assert (root / "one" / method / "completions.jsonl").read_text() == \
        (root / "two" / method / "completions.jsonl").read_text()
    weights = single[method]["weights"]
    control_diff = max(float((control[method]["weights"][name] - w).abs().max()) for name, w in weights.items())
    for name, w in weights.items():
        diff = float((ranks[0][method]["weights"][name] - w).abs().max())
        assert diff <= 10 * control_diff + 1e-6, (name, diff, control_diff)
        # DDP keeps the replicas bit-identical
        assert torch.equal(ranks[0][method]["weights"][name], ranks[1][method]["weights"][name])


def test_only_rank_zero_writes_one_run_directory(runs):
    *_, root = runs
    two = root / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted([*METHODS, "resumed", "result-rank0.pt", "result-rank1.pt"])
    for method in METHODS:
        run = two / method
        names = sorted(p.name for p in run.iterdir())
        one_names = sorted(p.name for p in (root / "one" / method).iterdir())
        assert names == one_names  # the same files as one process writes, no per-rank copies
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(read_metrics(root / "one" / method / "metrics.jsonl"))
        ckpt = run / "checkpoint-2"
        assert (ckpt / "rng_state.pt").is_file() and (ckpt / "rng_state-rank1.pt").is_file()


def test_prompts_per_step_must_split_over_the_ranks(tmp_path):
    cfg = make_cfg(tmp_path / "run", bank(tmp_path / "bank.json"), "grpo", prompts_per_step=3)
    fake = Distributed.__new__(Distributed)
    fake.env, fake.device, fake._owns_group = LaunchEnv(2, 0, 0), torch.device("cpu"), False
    with pytest.raises(ValueError, match="'prompts_per_step'"):
        Trainer(cfg, model=tiny_random_model(seed=1), tokenizer=tiny_tokenizer(), verifier=ParityVerifier(),
                log=lambda s: None, dist=fake)


def test_launch_environment_and_rank_device():
    assert LaunchEnv.from_environ({}) == LaunchEnv(1, 0, 0)
    assert LaunchEnv.from_environ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == LaunchEnv(4, 3, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        LaunchEnv.from_environ({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2"):
        LaunchEnv.from_environ({"WORLD_SIZE": "2", "RANK": "2"})
    assert rank_device("auto", LaunchEnv()) == "auto"
    assert rank_device("cpu", LaunchEnv(2, 1, 1)) == "cpu"
    if torch.cuda.is_available():
        assert rank_device("cuda", LaunchEnv(2, 1, 1)) == "cuda:1"


def test_two_process_resume_is_bit_exact(runs):
    """Each rank restores its own RNG file and rank 0's weights and optimizer: step 2 after the resume is
    the uninterrupted run's step 2, bit for bit (the same rollouts, the same reduction order)."""
    *_, ranks, root = runs
    for rank in range(WORLD):
        for name, w in ranks[rank]["sgsd"]["weights"].items():
            assert torch.equal(ranks[rank]["resumed"][name], w), (rank, name)
    rows = train_rows(root / "two" / "resumed")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == train_rows(root / "two" / "sgsd")[1]["loss"]


class KillingVerifier(ParityVerifier):
    """ParityVerifier that SIGKILLs its own process at its `at`-th call: a rank dying mid-step.

    With eval_at_start off the verifier runs once per training step, so call 2 is step 2, after
    its rollouts and before its update, and after checkpoint-1 is complete (the other rank waits
    in the save's broadcast until rank 0 has published it). Test-only: no hook in the trainer.
    """

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def score(self, completions, answers) -> VerifyResult:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score(completions, answers)


def _killed_worker(rank: int, port: int, run_dir: str, bank_file: str, victim: int) -> None:
    """The SGSD run of the `runs` fixture, except that rank `victim` dies in step 2."""
    dist = join_group(rank, port)
    tok = tiny_tokenizer()
    verifier = KillingVerifier(at=2) if rank == victim else ParityVerifier()
    with Trainer(make_cfg(Path(run_dir), Path(bank_file), "sgsd"), model=tiny_random_model(tok, hidden_size=32,
                 layers=2, seed=1), tokenizer=tok, verifier=verifier, log=lambda s: None, dist=dist) as trainer:
        trainer.train()


def _relaunched_worker(rank: int, port: int, run_dir: str, bank_file: str) -> None:
    """`--resume auto` in the same output_dir: the newest complete checkpoint, then the rest of the run."""
    dist = join_group(rank, port)
    try:
        tok = tiny_tokenizer()
        model = tiny_random_model(tok, hidden_size=32, layers=2, seed=2)  # other weights: the checkpoint must win
        with Trainer(make_cfg(Path(run_dir), Path(bank_file), "sgsd"), model=model, tokenizer=tok,
                     verifier=ParityVerifier(), log=lambda s: None, dist=dist,
                     resume=resolve_resume("auto", run_dir, log=lambda s: None)) as trainer:
            trainer.train()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   Path(run_dir).parent / f"relaunched-rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_a_rank_killed_mid_step_then_both_relaunched_resume_bit_exactly(runs, tmp_path):
    """kill -9 of rank 1 inside step 2, the job torn down, both ranks relaunched with `--resume auto`:
    the final weights and every logged value equal the uninterrupted 2-process run's, bit for bit.

    Tearing the job down is the launcher's part, as under torchrun, whose elastic agent SIGTERMs
    the surviving workers when one dies (checked by hand: `torchrun --standalone --nproc_per_node 2`
    on a script whose rank 1 SIGKILLs itself between two all_reduces ended rank 0 with SIGTERM and
    exited 1, 3.6 s wall in all); here `mp.spawn`'s join does the same. Gloo on one host also notices
    a dead peer by itself (in a hand check with two bare processes the survivor's pending all_reduce
    raised 'Connection reset by peer' after 0.01 s); a collective that cannot notice waits up to
    COLLECTIVE_TIMEOUT (2 h), which only the launcher's tear-down cuts short.
    """
    *_, ranks, root = runs
    run_dir, bank_file = tmp_path / "run", root / "bank.json"
    ctx = mp.spawn(_killed_worker, args=(free_port(), str(run_dir), str(bank_file), 1), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
            while not ctx.join(timeout=1):
                assert time.monotonic() < deadline, "a rank outlived its peer's death by 2 minutes"
        survivors = [p.pid for p in ctx.processes if p.is_alive()]
    finally:
        for p in ctx.processes:  # never leave a rank behind, whatever failed
            if p.is_alive():
                p.kill()
    assert not survivors  # the surviving rank was torn down, not left waiting in a collective
    assert ctx.processes[1].exitcode == -signal.SIGKILL
    assert [p.name for p in sorted(run_dir.glob("checkpoint-*"))] == ["checkpoint-1"]

    mp.spawn(_relaunched_worker, args=(free_port(), str(run_dir), str(bank_file)), nprocs=WORLD, join=True)
    uninterrupted = root / "two" / "sgsd"
    for rank in range(WORLD):
        weights = torch.load(tmp_path / f"relaunched-rank{rank}.pt")
        for name, w in ranks[rank]["sgsd"]["weights"].items():
            assert torch.equal(weights[name], w), (rank, name)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in read_metrics(uninterrupted / "metrics.jsonl")]
    assert logged(rows) == logged(read_metrics(uninterrupted / "metrics.jsonl"))
    assert (run_dir / "completions.jsonl").read_text() == (uninterrupted / "completions.jsonl").read_text()


def test_torchrun_train_command_end_to_end(tmp_path):
    """`torchrun --nproc_per_node 2 -m sgsd_fast.commands train` on a tiny saved model (LoRA, SGSD):
    one run directory, one set of logs, the summary printed once."""
    import subprocess
    import sys

    tok = tiny_tokenizer()
    tiny_random_model(tok, hidden_size=32, layers=2, seed=1).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    run = tmp_path / "run"
    args = ["--model", str(tmp_path / "tiny"), "--skill_bank", str(bank(tmp_path / "bank.json")), "--output_dir",
            str(run), "--prompts_per_step", "4", "--num_generations", "2", "--max_new_tokens", "4",
            "--num_teachers", "2", "--num_train_problems", "8", "--num_eval_problems", "2", "--max_steps", "2",
            "--eval_at_start", "false", "--progress", "false", "--verifier_workers", "1", "--report_to", "none",
            "--use_peft", "true", "--lora_r", "2", "--optim", "adamw_torch"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sgsd_fast.commands", "train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 2  # the start line and the summary, from rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json", "run", "tiny"]  # no runs/<timestamp>
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "eval_step" not in r] == [1, 2]
    assert (run / "checkpoint-2" / "rng_state-rank1.pt").is_file() and (run / "summary.json").is_file()
