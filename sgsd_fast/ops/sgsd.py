"""SGSD from hidden states: one student log-prob pass serves all K teachers (SPEC §3).

    teacher_logprobs(teacher_hidden, weight, targets)  -> q [B, K, T], forward only
    sgsd_loss(student_hidden, weight, targets, q, ...) -> (loss, metrics)

Nothing V-sized survives either call: each side reduces to one log-prob per token through the
fused `linear_logprobs`, and the gated objective is a cheap function of [B, K, T] tensors.

Using them in a training step::

    def teacher_states():                     # K teacher forwards, run lazily, no grad
        for ids, pos in teacher_inputs:       # [teacher prompt k] + the same completion ids
            with torch.no_grad():
                yield model(ids, position_ids=pos, output_hidden_states=True).hidden_states[-1][:, -T - 1:-1]

    q = teacher_logprobs(teacher_states(), lm_head.weight, completion_ids.masked_fill(~mask, -100))
    h = model(student_ids, output_hidden_states=True).hidden_states[-1][:, -T - 1:-1]   # [B, T, H]
    loss, metrics = sgsd_loss(h, lm_head.weight, completion_ids, q, mask, rewards, teacher_weights)
    loss.backward()
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sgsd_fast.losses import _checks as c
from sgsd_fast.losses.sgsd_gated import sgsd_gated_loss
from sgsd_fast.ops.linear_logprobs import linear_logprobs

_IGNORE = -100


def sgsd_loss(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    tau: float = 1.0,
    clip: float = 3.0,
    deadzone: float = 0.05,
    temperature: float = 1.0,
    outcome_baseline: float | None = None,
    backend: str = "auto",
    extra_metrics: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SGSD gated loss of `sgsd_fast.losses.sgsd_gated_loss` with s computed from hidden states.

    Args:
        student_hidden: [B, T, H] final (normed) hidden states of the student at the positions that
            predict targets; gradient flows here and to weight.
        weight: [V, H] lm_head weight (same dtype as student_hidden).
        targets: [B, T] int64 sampled ids; any value at mask == False positions (padding, prompt).
        teacher_logp: [B, K, T] teacher log-probs of the same ids (e.g. from `teacher_logprobs`).
        mask, rewards, teacher_weights, tau, clip, deadzone, outcome_baseline: as in `sgsd_gated_loss`.
        temperature: student logits are divided by it (SPEC §2).
        backend: linear_logprobs backend ("auto", "triton", "cpu", "reference").
        extra_metrics: forwarded to `sgsd_gated_loss` (e.g. a teacher entropy mean).

    s = linear_logprobs(student_hidden, weight, targets with masked positions ignored), so
    masked positions cost no FLOPs and give s = 0. The gradient is plain autograd through that
    op: the gated loss hands it exactly grad_logp_t = A_t = -sum_k a_k rho_k M_t
    sigmoid(-delta^2 / 2 tau) delta / (tau N B) (SPEC §3), and the op's backward turns it into the
    weighted cross-entropy-shaped gradient A_t (onehot - softmax) / temperature. No N x V tensor
    exists at any time with the fused backends ("auto", "triton", "cpu").

    metrics: those of `sgsd_gated_loss` plus student_entropy_mean (entropy of the student's
    full next-token distribution, averaged over masked-in tokens; a by-product of the fused pass).
    """
    c.check_float_tensor("student_hidden", student_hidden, 3, "[B, T, H]")
    b, t, h = student_hidden.shape
    c.check_bool_mask("mask", mask, (b, t), "[B, T] (B, T from student_hidden)")
    if isinstance(targets, torch.Tensor):
        c.check_same_device(student_hidden=student_hidden, mask=mask, targets=targets)
    _check_targets(targets, (b, t), mask)
    metrics = _caller_metrics(extra_metrics)
    flat_targets = torch.where(mask, targets, torch.full_like(targets, _IGNORE)).reshape(b * t)
    logp, _, entropy = linear_logprobs(
        student_hidden.reshape(b * t, h),
        weight,
        flat_targets,
        temperature=temperature,
        ignore_index=_IGNORE,
        backend=backend,
        return_entropy=True,
    )
    # Ignored rows have entropy 0, so the masked mean is a plain sum over the count.
    metrics["student_entropy_mean"] = entropy.sum() / mask.sum().clamp(min=1)
    return sgsd_gated_loss(
        logp.reshape(b, t),
        teacher_logp,
        mask,
        rewards,
        teacher_weights,
        tau=tau,
        clip=clip,
        deadzone=deadzone,
        outcome_baseline=outcome_baseline,
        extra_metrics=metrics,
    )


@torch.no_grad()
def teacher_logprobs(
    teacher_hidden: torch.Tensor | Iterable[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    num_teachers: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under K teachers, [B, K, T], without gradient.

    Args:
        teacher_hidden: a [K, B, T, H] tensor (scored in one op call), or an iterable of K
            [B, T, H] tensors, e.g. a generator running the teacher forwards lazily: each is reduced
            to [B, T] at once and dropped before the next one is requested, so only one teacher's
            hidden states are alive at a time.
        weight: [V, H] lm_head weight of the teachers.
        targets: [B, T] integer ids; positions equal to ignore_index give 0.
        temperature, ignore_index, backend: as in `linear_logprobs`.
        num_teachers: if given, K must equal it.
        return_entropy: also return each teacher's full next-token entropy, [B, K, T] (0 at
            ignored positions), for the SPEC §3 step metrics; it comes from the same pass.

    Returns fp32 (float64 for float64 hidden states, so oracle tests can stay in float64). Memory
    beyond the inputs and the [B, K, T] output is one op chunk, independent of V.
    """
    _check_targets(targets, None, None)
    opts = dict(temperature=temperature, ignore_index=ignore_index, backend=backend, with_entropy=return_entropy)
    if isinstance(teacher_hidden, torch.Tensor):
        c.check_float_tensor("teacher_hidden", teacher_hidden, 4, "[K, B, T, H]")
        k, b, t, h = teacher_hidden.shape
        c.check_shape("teacher_hidden", teacher_hidden, (k, *targets.shape, h), "[K, B, T, H] (B, T from targets)")
        _check_num_teachers(k, num_teachers)
        logp, entropy = _score(
            teacher_hidden.reshape(k * b * t, h), weight, targets.reshape(1, b * t).expand(k, b * t).reshape(-1), **opts
        )
        logp = logp.reshape(k, b, t).transpose(0, 1).contiguous()
        if not return_entropy:
            return logp
        return logp, entropy.reshape(k, b, t).transpose(0, 1).contiguous()
    if isinstance(teacher_hidden, (str, bytes)) or not isinstance(teacher_hidden, Iterable):
        raise TypeError(
            "teacher_hidden must be a [K, B, T, H] tensor or an iterable of K [B, T, H] tensors, "
            f"got {type(teacher_hidden).__name__}"
        )
    per_teacher: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    # No enumerate(): its cached result tuple would keep the previous teacher's hidden states alive
    # while the generator computes the next one.
    for hidden in teacher_hidden:
        name = f"teacher_hidden[{len(per_teacher)}]"
        c.check_float_tensor(name, hidden, 3, "[B, T, H]")
        c.check_shape(name, hidden, (*targets.shape, hidden.shape[-1]), "[B, T, H] (B, T from targets)")
        b, t, h = hidden.shape
        logp, entropy = _score(hidden.reshape(b * t, h), weight, targets.reshape(-1), **opts)
        per_teacher.append(logp.reshape(b, t))
        if return_entropy:
            entropies.append(entropy.reshape(b, t))
        # The loop variable would otherwise keep this teacher's hidden states alive while the
        # generator computes the next teacher's.
        del hidden
    if not per_teacher:
        raise ValueError("teacher_hidden yielded no teachers (K = 0); need at least one [B, T, H] tensor")
    _check_num_teachers(len(per_teacher), num_teachers)
    if not return_entropy:
        return torch.stack(per_teacher, dim=1)
    return torch.stack(per_teacher, dim=1), torch.stack(entropies, dim=1)


def _caller_metrics(extra_metrics) -> dict[str, torch.Tensor]:
    """A copy of the caller's extra metrics, checked before any work is done."""
    if extra_metrics is None:
        return {}
    if not isinstance(extra_metrics, Mapping):
        raise TypeError(f"extra_metrics must be a mapping of name -> tensor, got {type(extra_metrics).__name__}")
    if "student_entropy_mean" in extra_metrics:
        raise ValueError("extra_metrics must not redefine the built-in metric 'student_entropy_mean'")
    return dict(extra_metrics)


def _score(hidden, weight, targets, *, with_entropy: bool, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy or None) from linear_logprobs, whose return type depends on the flag."""
    if not with_entropy:
        return linear_logprobs(hidden, weight, targets, **kw), None
    logp, _, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, **kw)
    return logp, entropy


def _check_targets(targets, shape: tuple[int, int] | None, mask: torch.Tensor | None) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an int64 torch.Tensor of shape [B, T], got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor (int64) of shape [B, T], got {targets.dtype}")
    c.check_rank("targets", targets, 2, "[B, T]")
    if shape is not None:
        c.check_shape("targets", targets, shape, "[B, T] (B, T from student_hidden)")
    # linear_logprobs checks the upper bound; a negative id under mask == True would silently be
    # treated as ignored there, so it is caught here.
    if mask is not None and bool((mask & (targets < 0)).any()):
        raise ValueError("targets must be valid ids >= 0 wherever mask is True (found a negative id)")


def _check_num_teachers(k: int, num_teachers: int | None) -> None:
    if num_teachers is not None and k != num_teachers:
        raise ValueError(f"teacher_hidden holds K = {k} teachers, expected num_teachers = {num_teachers}")
    if k == 0:
        raise ValueError("teacher_hidden must hold at least one teacher (K >= 1), got K = 0")
