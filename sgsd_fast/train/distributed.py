"""Data-parallel training over torch.distributed: the launch environment, collectives, DDP.

    dist = Distributed.from_environment(cfg.device)   # WORLD_SIZE/RANK/LOCAL_RANK from torchrun
    share = dist.shard(problems)                       # this rank's contiguous slice of the step
    units = dist.sum_int(objective.units(mask))        # the exact normalizer of the whole batch

Launched by `torchrun` or `accelerate launch` (both set WORLD_SIZE, RANK, LOCAL_RANK and the
rendezvous address), the trainer runs one process per device; without those variables it is one
process and every method here is the identity, so a single-process run does exactly what it did
before this module existed (no process group, no extra arithmetic).

Why each rank must agree: the step's problems are drawn identically on every rank and each rank
takes a contiguous slice (whole problems, so a GRPO group never spans ranks); the normalizers of
the losses (rollouts for SGSD, valid tokens for OPSD / sampled RKL / GRPO) are summed over ranks
before any micro-batch is divided by them; DDP then averages the gradients, so every rank scales
its loss by the world size and the update equals the single-process update on the whole batch up
to the order of the floating-point sums.

DDP (`torch.nn.parallel.DistributedDataParallel`) does the gradient all-reduce. It only sees what
runs through its `forward`, and the fused losses take the decoder's hidden states and the lm_head
weight directly, so it wraps `HiddenStates`, a module that owns the whole policy (lm_head
included, so an untied head's gradient is reduced too) and returns the final-norm states.
With the config's `data_parallel: fsdp` the model is sharded in place instead
(`sgsd_fast.train.sharding`; no DDP wrapper): FSDP's reduce-scatter averages like DDP, so the
normalizers, the world-size factor and the rest stay as above.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from sgsd_fast.train.batch import rows_hidden

T = TypeVar("T")

# Collectives wait this long for the slowest rank; rank 0 alone saves checkpoints and evolves the
# skill bank while the others wait, which on a large model can take longer than torch's default.
COLLECTIVE_TIMEOUT = _dt.timedelta(hours=2)


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process (torchrun / accelerate launch variables)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> LaunchEnv:
        """Read WORLD_SIZE, RANK, LOCAL_RANK; one process when WORLD_SIZE is unset or 1."""
        values = {}
        for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
            raw = environ.get(name, "")
            try:
                values[name] = int(raw) if raw.strip() else default
            except ValueError:
                raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
        world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(f"inconsistent launch environment WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}")
        return cls(world, rank, local)


def rank_device(device: str, env: LaunchEnv) -> str:
    """The config's `device` for this rank: 'auto'/'cuda' become cuda:LOCAL_RANK under a launcher
    (every rank on cuda:0 would put the whole job on one card)."""
    if env.world_size == 1:
        return device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device in ("auto", "cuda"):
        return f"cuda:{env.local_rank}"
    return device


class HiddenStates(nn.Module):
    """policy -> its final-norm hidden states [B, L, H]: the module DDP wraps (see the module docstring)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
        return rows_hidden(self.policy, input_ids, attention_mask, position_ids, prefix_ids)


class Distributed:
    """This process's place in the job and the few collectives the trainer needs.

    With world_size 1 there is no process group and every collective returns its input.
    """

    def __init__(self, env: LaunchEnv = LaunchEnv(), *, device: torch.device | str = "cpu") -> None:
        self.env = env
        self.device = torch.device(device)
        self._owns_group = False
        if env.world_size > 1 and not tdist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tdist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=COLLECTIVE_TIMEOUT)
            self._owns_group = True
        if env.world_size > 1 and tdist.get_world_size() != env.world_size:
            raise ValueError(f"the process group has {tdist.get_world_size()} ranks, WORLD_SIZE says {env.world_size}")

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """The job as launched (torchrun / accelerate launch), on cuda:LOCAL_RANK on GPU."""
        env = LaunchEnv.from_environ()
        resolved = rank_device(device, env)
        if resolved == "auto":
            resolved = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(env, device=resolved)

    # ---- who am I ------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes logs, checkpoints, plots, the run directory and the skill bank."""
        return self.env.rank == 0

    @property
    def enabled(self) -> bool:
        return self.env.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of `items` (len(items) must be a multiple of the world size)."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} items cannot be split evenly over {self.world_size} ranks")
        per = n // self.world_size
        return list(items[self.rank * per:(self.rank + 1) * per])

    def offset(self, n: int) -> int:
        """Index of this rank's first item in a batch of `n` split by `shard`."""
        return self.rank * (n // self.world_size)

    # ---- collectives ---------------------------------------------------------------------------

    def _reduce(self, values: Sequence[float], op: Any, dtype: torch.dtype) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=dtype, device=self.device)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so the sum of a few float32 values is exact)."""
        return self._reduce(values, tdist.ReduceOp.SUM, torch.float64)

    def sum_int(self, value: int) -> int:
        return int(self._reduce([value], tdist.ReduceOp.SUM, torch.int64)[0])

    def max_int(self, value: int) -> int:
        return int(self._reduce([value], tdist.ReduceOp.MAX, torch.int64)[0])

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is True on every rank (so all ranks skip a step together)."""
        return bool(self._reduce([int(flag)], tdist.ReduceOp.MIN, torch.int64)[0])

    def any_true(self, flag: bool) -> bool:
        return bool(self._reduce([int(flag)], tdist.ReduceOp.MAX, torch.int64)[0])

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather_concat(self, items: Sequence[T]) -> list[T]:
        """Every rank's list, concatenated in rank order: the whole batch in single-process order."""
        return [x for part in self.gather(list(items)) for x in part]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and return its result on every rank; an exception it raises is
        re-raised on every rank, so a failure (a bad run directory, a full disk) stops the whole job
        instead of leaving the other ranks waiting in their next collective."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank
                error = err
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    # ---- gradients -----------------------------------------------------------------------------

    def data_parallel(self, model: nn.Module) -> nn.Module | None:
        """The DDP-wrapped `HiddenStates(model)` that the update step runs its forwards through, or
        None in one process. Construction broadcasts rank 0's weights, so all replicas start equal."""
        if not self.enabled:
            return None
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(HiddenStates(model), device_ids=device_ids)

    def close(self) -> None:
        """Tear down the process group if this object created it."""
        if self._owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self._owns_group = False


SINGLE = Distributed()


@contextlib.contextmanager
def accumulate(ddp: nn.Module | None, *, sync: bool) -> Iterator[None]:
    """Gradient accumulation under DDP: micro-batches before the last run in `no_sync` (gradients
    stay local), the last one's backward all-reduces the accumulated sum once."""
    if ddp is None or sync:
        yield
    else:
        with ddp.no_sync():
            yield
