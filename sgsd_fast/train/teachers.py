"""The teacher pool: teacher parameters, privileged contexts, and the teachers' scores.

A teacher is the policy itself (stop-gradient) reading the problem *plus* privileged context c and
scoring the student's identical completion ids (SPEC §1). This module

* provides the teacher parameters (`TeacherParams`): ``live`` (current weights), ``frozen``
  (initial weights; with LoRA the adapter is disabled, no copy) or ``ema`` (LoRA: an EMA of the
  adapter swapped in for the teacher pass; full fine-tuning: a full EMA copy);
* retrieves the SGSD contexts: K (skill, mistake) pairs per problem with weights a_k
  (`retrieve_contexts`); the prompt wording is `sgsd_fast.prompts`;
* scores completions (`TeacherPool.score`): per micro-batch, the K teacher forwards run lazily,
  one at a time under no_grad, and `sgsd_fast.ops.teacher_logprobs` reduces each at once to the
  log-probs of the completion tokens (never the model's lm_head, never a logit matrix), so only a
  [B, K, T] tensor survives. This is the op the tests check against float64 and `sgsd-fast bench`
  measures.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sgsd_fast.config import TEACHER_PARAMS
from sgsd_fast.models import is_peft_model, lm_head_weight
from sgsd_fast.ops import teacher_logprobs
from sgsd_fast.prompts import AnswerFormat, answer_conditioned_messages, render_prompt, skill_conditioned_messages
from sgsd_fast.train.batch import completion_targets, forward_hidden, pack
from sgsd_fast.train.sharding import fsdp_root, through_root


def _fields(item: Any) -> dict[str, str] | None:
    return None if item is None else dict(item.fields)


def retrieve_contexts(retriever: Any, problems: Sequence[Any], k: int) -> tuple[list[list[Any]], torch.Tensor]:
    """Up to K teacher contexts per problem and their weights a_k as a [B, K'] tensor.

    K' is the most contexts any problem of the batch got: a bank with fewer than K pairs gives
    fewer teachers, not K passes of which the surplus weigh 0 (each teacher is a full forward
    pass). A problem with fewer than K' is filled by repeating its last context with weight 0,
    which the SGSD loss treats as an absent teacher. A problem with none is an error.
    """
    retrieved = [list(retriever.retrieve(prob.question, prob.id))[:k] for prob in problems]
    for prob, ctxs in zip(problems, retrieved):
        if not ctxs:
            raise ValueError(f"the skill bank gave no teacher context for problem {prob.id!r}: it needs at least "
                             f"one skill and one mistake (see `sgsd-fast skills build`)")
    width = max((len(ctxs) for ctxs in retrieved), default=0)
    weights = torch.zeros(len(problems), width, dtype=torch.float32)
    contexts: list[list[Any]] = []
    for b, ctxs in enumerate(retrieved):
        for j, ctx in enumerate(ctxs):
            weights[b, j] = float(ctx.weight)
        weights[b] /= weights[b].sum()
        contexts.append(ctxs + [ctxs[-1]] * (width - len(ctxs)))
    return contexts, weights


class TeacherParams:
    """Which parameters score the teacher passes: ``live``, ``frozen`` or ``ema`` (SPEC §4).

    Without LoRA, ``frozen`` and ``ema`` keep one extra full copy of the model (documented cost);
    with LoRA they cost nothing (adapter disabled) or one copy of the adapter.
    """

    def __init__(self, model: nn.Module, mode: str = "live", *, ema_decay: float = 0.99) -> None:
        if mode not in TEACHER_PARAMS:
            raise ValueError(f"teacher_params must be 'live', 'frozen' or 'ema', got {mode!r}")
        self.model, self.mode, self.ema_decay = model, mode, ema_decay
        self.peft = is_peft_model(model)
        self._copy: nn.Module | None = None
        self._ema_adapter: dict[str, torch.Tensor] = {}
        if mode != "live" and not self.peft:
            self._copy = copy.deepcopy(model).eval().requires_grad_(False)
        elif mode == "ema":
            self._ema_adapter = {n: p.detach().clone() for n, p in self._trainable()}

    def _trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def scoring_model(self) -> Iterator[nn.Module]:
        """Context manager yielding the module to run the teacher passes with."""
        if self._copy is not None:
            yield self._copy
        elif self.mode == "frozen":
            with self.model.disable_adapter():
                yield self.model
        elif self.mode == "ema":
            params = dict(self._trainable())
            backup = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self._ema_adapter[n])
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(backup[n])
        else:
            yield self.model

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA toward the current weights (call after each optimizer step)."""
        if self.mode != "ema":
            return
        d = self.ema_decay
        if self._copy is not None:
            for e, p in zip(self._copy.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1.0 - d)
        else:
            for n, p in self._trainable():
                self._ema_adapter[n].lerp_(p.detach(), 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher state a checkpoint must keep (empty for live and LoRA-frozen teachers)."""
        if self._copy is not None:
            return {k: v.detach().clone() for k, v in self._copy.state_dict().items()}
        return {k: v.clone() for k, v in self._ema_adapter.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self._copy is not None:
            self._copy.load_state_dict(state)
        elif self.mode == "ema":
            missing = set(self._ema_adapter) - set(state)
            if missing:
                raise ValueError(f"EMA teacher state lacks {len(missing)} adapter tensors, e.g. {sorted(missing)[:3]}")
            for n in self._ema_adapter:
                self._ema_adapter[n].copy_(state[n])


class TeacherPool:
    """Runs the teacher passes: privileged prompts + the student's completion ids, no gradient.

    Args:
        model, tokenizer: the policy (the teachers are the same network).
        params: which parameters score, one of `TEACHER_PARAMS` (see `TeacherParams`).
        ema_decay: EMA decay for params="ema".
        micro_batch_size: rollouts per teacher forward.
        chat_template, thinking: the teacher side's own rendering (SPEC §4: Qwen3 thinks as a teacher).
        fmt: the answer format, the student's own (`sgsd_fast.prompts.AnswerFormat` or its name).
        temperature: tau_s of the teacher log-probs.
        share_prefix: run the prompt prefix a micro-batch's teacher prompts share (system prompt, worked
            example, preamble: ~100 tokens on the embedded job) once (`sgsd_fast.train.batch.pack`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, params: str = "live", ema_decay: float = 0.99,
                 micro_batch_size: int = 8, chat_template: bool = True, thinking: bool | None = None,
                 temperature: float = 1.0, fmt: str | AnswerFormat = "boxed", share_prefix: bool = True) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.tokenizer = tokenizer
        self.params = TeacherParams(model, params, ema_decay=ema_decay)
        self.micro_batch_size = micro_batch_size
        self.chat_template, self.thinking = chat_template, thinking
        self.temperature = temperature
        self.fmt = fmt
        self.share_prefix = share_prefix

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a rendered teacher prompt (the teacher side's own template and thinking flag)."""
        text = render_prompt(self.tokenizer, messages, chat_template=self.chat_template, thinking=self.thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_conditioned(self, problems: Sequence[Any]) -> list[list[int]]:
        """One OPSD teacher prompt per problem: the problem plus its reference answer."""
        return [self.prompt_ids(answer_conditioned_messages(p.question, p.answer, self.fmt)) for p in problems]

    def skill_conditioned(self, problems: Sequence[Any], contexts: Sequence[Sequence[Any]]) -> list[list[list[int]]]:
        """K SGSD teacher prompts per problem, one per retrieved (skill, mistake) context."""
        return [[self.prompt_ids(skill_conditioned_messages(p.question, _fields(c.skill), _fields(c.mistake), self.fmt))
                 for c in ctxs] for p, ctxs in zip(problems, contexts)]

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[tuple[nn.Module, torch.Tensor]]:
        """(module in eval mode, its lm_head weight) for the teacher passes; the mode is restored after.

        A sharded model's head is read inside its root's forward, which gathers it; the root stays
        gathered until the next backward (`sgsd_fast.train.sharding`), so the head stays whole
        through the teacher passes here, which run without gradient.
        """
        with self.params.scoring_model() as model:
            was_training = model.training
            model.eval()
            try:
                yield model, through_root(model, lambda: lm_head_weight(model))
            finally:
                model.train(was_training)

    def _micro_batches(self, n: int) -> Iterator[slice]:
        for b0 in range(0, n, self.micro_batch_size):
            yield slice(b0, min(b0 + self.micro_batch_size, n))

    def _states(self, model: nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                length: int, device: torch.device) -> torch.Tensor:
        batch = pack(prompts, completions, pad_id=self.tokenizer.pad_token_id, length=length, device=device,
                     share_prefix=self.share_prefix)
        return forward_hidden(model, batch)

    @torch.no_grad()
    def hidden(self, teacher_prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher's final hidden states at the completion positions, [B, length, H], and its lm_head.

        For full-vocabulary objectives (OPSD) that need the teacher's whole distribution: H-sized
        states survive instead of V-sized logits; the divergence op recomputes logits tile by tile.
        """
        with self._scoring() as (model, head):
            chunks = [self._states(model, teacher_prompts[sl], completions[sl], length, head.device)
                      for sl in self._micro_batches(len(completions))]
            # A sharded root frees its gathered head at each micro-batch's backward, and the loss
            # reads this one in every micro-batch: a copy of its own.
            head = head.detach().clone() if fsdp_root(model) is not None else head.detach()
        return torch.cat(chunks), head

    @torch.no_grad()
    def score(self, teacher_prompts: Sequence[Sequence[Sequence[int]]], completions: Sequence[Sequence[int]],
              length: int) -> torch.Tensor:
        """[B, K, length] fp32 log-probs of each completion under each of its K teacher prompts.

        teacher_prompts[b][k] are the ids of teacher k's prompt for rollout b. Positions past a
        completion's end are 0.
        """
        b_total = len(completions)
        if len(teacher_prompts) != b_total:
            raise ValueError(f"teacher_prompts has {len(teacher_prompts)} rows for {b_total} completions")
        k_total = len(teacher_prompts[0])
        if any(len(row) != k_total for row in teacher_prompts):
            raise ValueError("every rollout needs the same number of teacher prompts")

        with self._scoring() as (model, head):
            def states(sl: slice) -> Iterator[torch.Tensor]:
                # A generator: teacher_logprobs reduces each teacher's [mb, T, H] states to [mb, T]
                # before asking for the next, so one teacher's states are alive at a time.
                for k in range(k_total):
                    yield self._states(model, [row[k] for row in teacher_prompts[sl]], completions[sl], length,
                                       head.device)

            scores = [teacher_logprobs(states(sl), head, completion_targets(completions[sl], length, head.device),
                                       temperature=self.temperature, num_teachers=k_total)
                      for sl in self._micro_batches(b_total)]
        return torch.cat(scores).float()
