"""The teacher pool: privileged contexts, teacher input assembly, teacher weights and teacher scores.

A teacher is the policy itself (stop-gradient) reading the problem *plus* privileged context c and
scoring the student's identical completion ids (SPEC §1). This module

* builds the contexts: K retrieved (skill, mistake) pairs with weights a_k for SGSD, or one
  answer-conditioned prompt for OPSD / sampled-token RKL;
* assembles teacher (and student) inputs as ``[left pad][prompt][completion][right pad]`` so every
  completion starts at the same column and the position ids, taken from the cumulative attention
  mask, continue from the prompt without a gap;
* provides the teacher parameters: ``live`` (current weights), ``frozen`` (initial weights; with
  LoRA the adapter is disabled, no copy) or ``ema`` (LoRA: an EMA of the adapter swapped in for the
  teacher pass; full fine-tuning: a full EMA copy);
* runs the teachers one at a time under no_grad, micro-batched, reducing each forward at once to
  the log-probs of the completion tokens with the fused LM-head op (never the model's lm_head,
  never a logit matrix), so only a [B, K, T] tensor survives;
* builds the SPEC §3 token mask M_t.
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sgsd_fast.models import decoder, lm_head_weight
from sgsd_fast.ops.linear_logprobs import linear_logprobs
from sgsd_fast.prompts import AnswerFormat, answer_format, render_prompt

IGNORE_INDEX = -100
_NEWLINES_ONLY = re.compile(r"\n{1,8}")
_ADDED_CONTROL = re.compile(r"<\|.*\|>")
_THINK_TAGS = ("<think>", "</think>")


# ---- token mask -----------------------------------------------------------------------------


class TokenMasker:
    """Decides which completion tokens count in the SGSD loss (SPEC §3 token mask M_t).

    Excluded: the tokenizer's special ids (so EOS), added tokens spelled ``<|...|>``, ``<think>`` /
    ``</think>``, and tokens that decode to 1-8 newlines only. With ``keep_eos=True`` (OPSD's
    convention) the EOS id is kept while the other rules still apply. Decisions are cached per id,
    so only ids that actually occur are ever decoded.
    """

    def __init__(self, tokenizer: Any, *, keep_eos: bool = False) -> None:
        self.tokenizer = tokenizer
        excluded = set(int(i) for i in tokenizer.all_special_ids)
        for text, idx in tokenizer.get_added_vocab().items():
            if _ADDED_CONTROL.fullmatch(text) or text in _THINK_TAGS:
                excluded.add(int(idx))
        if keep_eos and tokenizer.eos_token_id is not None:
            excluded.discard(int(tokenizer.eos_token_id))
        self._excluded = excluded
        self._cache: dict[int, bool] = {}

    def keep(self, token_id: int) -> bool:
        token_id = int(token_id)
        if token_id not in self._cache:
            if token_id in self._excluded:
                self._cache[token_id] = False
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
                self._cache[token_id] = not (_NEWLINES_ONLY.fullmatch(text) or text in _THINK_TAGS)
        return self._cache[token_id]

    def mask(self, completion_ids: Sequence[Sequence[int]], length: int) -> torch.Tensor:
        """[B, length] bool: True where a completion token counts; padding is False."""
        out = torch.zeros(len(completion_ids), length, dtype=torch.bool)
        for b, ids in enumerate(completion_ids):
            if len(ids) > length:
                raise ValueError(f"completion {b} has {len(ids)} tokens, more than length={length}")
            out[b, : len(ids)] = torch.tensor([self.keep(t) for t in ids], dtype=torch.bool)
        return out


# ---- input assembly -------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """``[left pad][prompt][completion][right pad]`` rows; completion token j sits at column start + j.

    The hidden state that predicts completion token j is at column start + j - 1, so
    ``hidden[:, start - 1 : start - 1 + T]`` lines up with ``targets`` ([B, T]).
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, T], IGNORE_INDEX after each completion's end
    start: int  # column of the first completion token

    def completion_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, T, H]: the states that predict the completion tokens."""
        t = self.targets.shape[1]
        return hidden[:, self.start - 1 : self.start - 1 + t]


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int,
         length: int | None = None, device: torch.device | str = "cpu") -> PackedBatch:
    """Left-pad prompts and right-pad completions to `length` (default: the longest completion)."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) must have the same length")
    if not prompts:
        raise ValueError("cannot pack an empty batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the state before the first completion token)")
    t = max(len(c) for c in completions) if length is None else length
    if t < 1 or any(len(c) > t for c in completions):
        raise ValueError(f"length={t} must be >= 1 and >= every completion's length")
    p = max(len(x) for x in prompts)
    b = len(prompts)
    ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    att = torch.zeros((b, p + t), dtype=torch.long)
    targets = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        ids[i, p - len(pr) : p] = torch.tensor(list(pr), dtype=torch.long)
        att[i, p - len(pr) : p + len(co)] = 1
        if co:
            ids[i, p : p + len(co)] = torch.tensor(list(co), dtype=torch.long)
            targets[i, : len(co)] = ids[i, p : p + len(co)]
    # Positions count real tokens only: the completion continues right after the prompt whatever
    # the left padding, exactly as in an unpadded forward.
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(ids.to(device), att.to(device), pos.to(device), targets.to(device), p)


def forward_hidden(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final-norm hidden states [B, T, H] at the positions that predict the completion tokens."""
    out = decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False)
    return batch.completion_hidden(out.last_hidden_state)


# ---- contexts -------------------------------------------------------------------------------


def answer_conditioned_messages(question: str, answer: str, fmt: str | AnswerFormat = "boxed") -> list[dict]:
    """OPSD's privileged prompt: the format's example turns, the problem, the reference answer, and
    the format's instruction."""
    content = (
        f"{question}\n\n"
        f"(For you only: the correct final answer is {answer}. Solve the problem yourself step by step "
        f"so that your reasoning arrives at it; do not mention that you were told the answer.)"
    )
    return answer_format(fmt).messages(content)


def retrieve_contexts(retriever: Any, problems: Sequence[Any], k: int) -> tuple[list[list[Any]], torch.Tensor]:
    """K teacher contexts per problem and their weights a_k as a [B, K] tensor.

    A problem that gets fewer than K pairs (small bank) is filled by repeating its last context with
    weight 0, which the SGSD loss treats as an absent teacher. A problem with none is an error.
    """
    contexts: list[list[Any]] = []
    weights = torch.zeros(len(problems), k, dtype=torch.float32)
    for b, prob in enumerate(problems):
        ctxs = list(retriever.retrieve(prob.question, prob.id))[:k]
        if not ctxs:
            raise ValueError(f"the skill bank gave no teacher context for problem {prob.id!r}: it needs at least "
                             f"one skill and one mistake (see `sgsd-fast skills build`)")
        for j, ctx in enumerate(ctxs):
            weights[b, j] = float(ctx.weight)
        weights[b] /= weights[b].sum()
        contexts.append(ctxs + [ctxs[-1]] * (k - len(ctxs)))
    return contexts, weights


# ---- teacher weights ------------------------------------------------------------------------


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class TeacherWeights:
    """Which parameters score the teacher passes: ``live``, ``frozen`` or ``ema`` (SPEC §4).

    Without LoRA, ``frozen`` and ``ema`` keep one extra full copy of the model (documented cost);
    with LoRA they cost nothing (adapter disabled) or one copy of the adapter.
    """

    def __init__(self, model: nn.Module, mode: str = "live", *, ema_decay: float = 0.99) -> None:
        if mode not in ("live", "frozen", "ema"):
            raise ValueError(f"teacher_weights must be 'live', 'frozen' or 'ema', got {mode!r}")
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


# ---- scoring --------------------------------------------------------------------------------


class TeacherPool:
    """Scores completions under K privileged teachers: one forward per teacher per micro-batch."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, weights: str = "live", ema_decay: float = 0.99,
                 micro_batch_size: int = 8, chat_template: bool = True, thinking: bool | None = None,
                 temperature: float = 1.0) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.tokenizer = tokenizer
        self.weights = TeacherWeights(model, weights, ema_decay=ema_decay)
        self.micro_batch_size = micro_batch_size
        self.chat_template, self.thinking = chat_template, thinking
        self.temperature = temperature

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a rendered teacher prompt (the teacher side's own template and thinking flag)."""
        text = render_prompt(self.tokenizer, messages, chat_template=self.chat_template, thinking=self.thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def hidden(self, teacher_prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher's final hidden states at the completion positions, [B, length, H], and its lm_head.

        For full-vocabulary objectives (OPSD) that need the teacher's whole distribution: H-sized
        states survive instead of V-sized logits; the divergence op recomputes logits tile by tile.
        """
        with self.weights.scoring_model() as model:
            was_training = model.training
            model.eval()
            try:
                weight = lm_head_weight(model)
                chunks = []
                for b0 in range(0, len(completions), self.micro_batch_size):
                    b1 = min(b0 + self.micro_batch_size, len(completions))
                    batch = pack(teacher_prompts[b0:b1], completions[b0:b1], pad_id=self.tokenizer.pad_token_id,
                                 length=length, device=weight.device)
                    chunks.append(forward_hidden(model, batch))
            finally:
                model.train(was_training)
        return torch.cat(chunks), weight.detach()

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
        with self.weights.scoring_model() as model:
            was_training = model.training
            model.eval()
            try:
                weight = lm_head_weight(model)
                device = weight.device
                out = torch.zeros(b_total, k_total, length, dtype=torch.float32, device=device)
                pad = self.tokenizer.pad_token_id
                for k in range(k_total):  # one teacher at a time: only its [mb, T, H] states are alive
                    for b0 in range(0, b_total, self.micro_batch_size):
                        b1 = min(b0 + self.micro_batch_size, b_total)
                        batch = pack([teacher_prompts[b][k] for b in range(b0, b1)], completions[b0:b1],
                                     pad_id=pad, length=length, device=device)
                        hidden = forward_hidden(model, batch)
                        h = hidden.reshape(-1, hidden.shape[-1])
                        logp = linear_logprobs(h, weight, batch.targets.reshape(-1), temperature=self.temperature,
                                               ignore_index=IGNORE_INDEX)
                        out[b0:b1, k] = logp.reshape(b1 - b0, length).float()
                        del hidden, h, logp
            finally:
                model.train(was_training)
        return out
