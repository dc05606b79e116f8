"""The student's and the teachers' model inputs, and which completion tokens count.

* `pack` lays a batch out as ``[left pad][prompt][completion][right pad]`` so every completion
  starts at the same column and the position ids, taken from the cumulative attention mask,
  continue from the prompt without a gap (SPEC §1: the teacher scores the identical ids).
  With ``share_prefix`` the tokens every prompt of the batch starts with (the chat system prompt,
  the worked example, the teacher preamble) are taken out of the rows and run once
  (`sgsd_fast.models.prefix_cache`): the rows become ``[left pad][rest of prompt][completion]
  [right pad]`` after a cached prefix, the same attention and positions as the plain layout;
* `forward_hidden` runs the decoder on it and keeps the final-norm states that predict the
  completion tokens, [B, T, H] (the fused ops take it from there; the lm_head never runs);
  `states_and_head` adds the lm_head weight, gathered whole when the model is sharded;
* `TokenMasker` builds the SPEC §3 token mask M_t.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sgsd_fast.models import decoder, lm_head_weight, prefix_cache, shared_prefix_length
from sgsd_fast.ops import IGNORE_INDEX
from sgsd_fast.train.sharding import through_root

_NEWLINES_ONLY = re.compile(r"\n{1,8}")
_ADDED_CONTROL = re.compile(r"<\|.*\|>")
_THINK_TAGS = ("<think>", "</think>")


@dataclass
class PackedBatch:
    """``[left pad][prompt][completion][right pad]`` rows; completion token j sits at column start + j.

    The hidden state that predicts completion token j is at column start + j - 1, so
    ``hidden[:, start - 1 : start - 1 + T]`` lines up with ``targets`` ([B, T]).

    With a shared prefix of P tokens, `prefix_ids` holds it and the rows hold the rest: the
    attention mask then spans the prefix too ([B, P + L], its first P columns 1) and the position
    ids continue at each row's P + (prompt tokens before).
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, P + L]
    position_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, T], IGNORE_INDEX after each completion's end
    start: int  # column of the first completion token in input_ids
    prefix_ids: torch.Tensor | None = None  # [P], the tokens every row's prompt starts with

    def completion_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, T, H]: the states that predict the completion tokens."""
        t = self.targets.shape[1]
        return hidden[:, self.start - 1 : self.start - 1 + t]


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int,
         length: int | None = None, device: torch.device | str = "cpu", share_prefix: bool = False) -> PackedBatch:
    """Left-pad prompts and right-pad completions to `length` (default: the longest completion);
    with `share_prefix`, the prompts' common prefix goes to `prefix_ids` (see `PackedBatch`)."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) must have the same length")
    if not prompts:
        raise ValueError("cannot pack an empty batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the state before the first completion token)")
    t = max(len(c) for c in completions) if length is None else length
    if t < 1 or any(len(c) > t for c in completions):
        raise ValueError(f"length={t} must be >= 1 and >= every completion's length")
    shared = shared_prefix_length(prompts) if share_prefix else 0
    prefix_ids = torch.tensor(list(prompts[0][:shared]), dtype=torch.long, device=device) if shared else None
    prompts = [x[shared:] for x in prompts]
    p = max(len(x) for x in prompts)
    b = len(prompts)
    ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    att = torch.zeros((b, p + t), dtype=torch.long)
    targets = completion_targets(completions, t)
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        ids[i, p - len(pr) : p] = torch.tensor(list(pr), dtype=torch.long)
        att[i, p - len(pr) : p + len(co)] = 1
        ids[i, p : p + len(co)] = targets[i, : len(co)]
    # Positions count real tokens only: the completion continues right after the prompt whatever
    # the left padding, exactly as in an unpadded forward.
    att = torch.cat([torch.ones((b, shared), dtype=torch.long), att], dim=1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    return PackedBatch(ids.to(device), att.to(device), pos.to(device), targets.to(device), p, prefix_ids)


def completion_targets(completions: Sequence[Sequence[int]], length: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, length] int64: each completion's ids, then IGNORE_INDEX (what `pack` puts in `targets`)."""
    targets = torch.full((len(completions), length), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(completions):
        targets[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    return targets.to(device)


# A sharded model (FSDP) runs the decoder as its root's forward (`through_root`), which gathers the
# embeddings and the head; the completion slice is taken after it, because FSDP's backward hook on
# a view that a forward returns is lost by in-place ops on it (FSDP warns about every such view).


def forward_hidden(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final-norm hidden states [B, T, H] at the positions that predict the completion tokens."""
    return batch.completion_hidden(through_root(model, lambda: _batch_rows_hidden(model, batch)))


def states_and_head(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_hidden` and the [V, H] lm_head weight the states are scored with, from one pass: for
    a sharded model the head is read inside its root's forward, gathered whole (and its gradient
    reduce-scattered to the shards after the backward)."""
    hidden, head = through_root(model, lambda: (_batch_rows_hidden(model, batch), lm_head_weight(model)))
    return batch.completion_hidden(hidden), head


def _batch_rows_hidden(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    return rows_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prefix_ids)


def rows_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of a `PackedBatch`'s rows, its shared prefix run once first.

    Takes the batch's tensors rather than the batch so that DDP, which wraps this call
    (`sgsd_fast.train.distributed.HiddenStates`), sees them as its forward's inputs.
    """
    cache = {} if prefix_ids is None else prefix_cache(model, prefix_ids, input_ids.shape[0])
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=bool(cache), **cache)
    return out.last_hidden_state


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
