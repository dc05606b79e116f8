"""Sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for the policy: `data_parallel: fsdp`.

    shard_policy(model, device=dist.device, world_size=dist.world_size)  # in place, before the optimizer
    out = through_root(model, fn)       # fn() as the root's forward (batch.forward_hidden, states_and_head)
    model_state, optimizer_state = full_state_dicts(model, optimizer)    # collective; whole on rank 0

Layout, as in transformers' own FSDP2 plan (transformers/distributed/fsdp.py): every decoder
layer is one FSDP group (all-gathered for its forward, freed after it, gathered again for its
backward, gradients reduce-scattered); the root group is the rest of the causal LM (embeddings,
final norm, lm_head, tied or not: a tied pair must sit in one group) and stays gathered from its
forward to the end of the backward (`reshard_after_forward=False`, FSDP2's default for a root),
because the fused loss reads the head right after the decoder and the backward needs it again. With LoRA the adapters live in the layer
groups and are all that is trained; the frozen base is sharded as well.

What the fused ops get: the whole lm_head, gathered, never a vocabulary shard. The kernels
normalize each row over all V logits (a log-softmax computed tile by tile); per-shard heads
would need a cross-rank max and sum-exp per row inside every forward and backward of every op
(log-probs, the K-teacher scoring, the OPSD divergences over two distributions), while the head
is one [V, H] matrix that FSDP all-gathers for the root's forward anyway. The cost is that matrix
whole on every rank while the root is gathered (V x H x the compute dtype: 0.6 GB in bf16 for
Qwen3-1.7B's tied 151936 x 2048), on top of one gathered layer at a time.

The fused losses run outside `forward`, where FSDP gathers nothing, so the student's and the
teachers' passes run *as* the root's forward (`through_root`: the forward redirection of
Lightning's strategies, which Liger-Kernel's FSDP trainers use for their fused losses): FSDP's pre-forward gathers the root, each layer gathers itself, and
the head read inside is the gathered weight, whose gradient FSDP reduce-scatters to the shards
after the backward. `generate` calls the root's forward itself, so rollouts and evaluation need
nothing; the root carries transformers' FSDP flag, so generate runs with `synced_gpus` and a rank
whose sequences have all ended keeps stepping until every rank's have (its forwards are
collectives the other ranks wait in).

Gradient accumulation reduce-scatters after every micro-batch (no `no_sync` as under DDP):
keeping unsharded gradients across micro-batches would hold a whole gradient per rank, which is
what FSDP exists to avoid. Gradient checkpointing is transformers' own (non-reentrant, inside
each layer's forward), which FSDP2 recomputes through. Mixed precision is FSDP2's
`MixedPrecisionPolicy` (`fsdp_param_dtype`): parameters gathered and computed in that dtype,
shards and optimizer states in the model's dtype, gradients reduced in float32.

torch.distributed.fsdp costs ~1 s to import, so it is imported where sharding happens, not when
this module is.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from sgsd_fast.models import base_model, decoder, is_peft_model

T = TypeVar("T")


def shard_policy(model: nn.Module, *, device: torch.device, world_size: int,
                 param_dtype: torch.dtype | None = None) -> None:
    """Shard `model` in place over the `world_size` ranks of the default process group.

    Each rank must hold the same weights (each keeps its slice of what it holds: build or load the
    model identically everywhere first). The parameters become DTensor shards, so an optimizer
    must be built afterwards. param_dtype: FSDP2 mixed precision (see the module docstring).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(decoder(model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"config field 'data_parallel': 'fsdp' shards decoder layers, and the decoder of "
                         f"{type(base_model(model)).__name__} has no `layers` list")
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    root = base_model(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    # transformers' own mark of an FSDP2 model: generate() then runs with synced_gpus.
    root._is_fsdp_managed_module = True


def fsdp_root(model: nn.Module) -> nn.Module | None:
    """The FSDP root of a model sharded by `shard_policy` (its causal LM), or None when it is not sharded."""
    root = base_model(model)
    if not getattr(root, "_is_fsdp_managed_module", False):
        return None
    from torch.distributed.fsdp import FSDPModule

    return root if isinstance(root, FSDPModule) else None


def through_root(model: nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` run as the forward of `model`'s FSDP root, so FSDP gathers the root group for it and
    registers its backward hooks on what `fn` returns; plainly `fn()` when the model is not sharded.

    Forward redirection: the root's `forward` is swapped for `fn` during one call of the module,
    and restored before `fn` runs, so a forward of the root inside `fn` would be the real one.
    """
    root = fsdp_root(model)
    if root is None:
        return fn()
    had_own = "forward" in vars(root)
    own = vars(root).get("forward")

    def restore() -> None:
        if had_own:
            root.forward = own
        else:
            vars(root).pop("forward", None)

    def redirected() -> T:
        restore()
        return fn()

    root.forward = redirected
    try:
        return root()
    finally:
        restore()


# ---- checkpoints ---------------------------------------------------------------------------------
# A checkpoint of a sharded run holds the same files as an unsharded one: save_pretrained of the
# whole weights, and torch's own optimizer state_dict (parameters numbered in the optimizer's order).
# So it resumes under either data_parallel value, and eval / export read it as they read any.


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer entry, in the order torch's `state_dict` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(model state, optimizer state) whole, on the CPU of rank 0; (None, None) on the other ranks.

    A collective: every rank must call it. The model state is what `save_pretrained` takes: the
    trainable tensors only for a LoRA model (the adapter is what it saves), tied aliases dropped as
    `save_pretrained` itself does. The optimizer state is in torch's format, as
    `optimizer.state_dict()` of an unsharded run.
    """
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft_model(model)))
    named = get_optimizer_state_dict(model, optimizer, options=whole)
    if tdist.get_rank() != 0:
        return None, None
    # A tied parameter is listed once by named_parameters() but under each of its names here.
    aliases = ({n for n, _ in model.named_parameters(remove_duplicate=False)} -
               {n for n, _ in model.named_parameters()})
    model_state = {k: v for k, v in model_state.items() if k not in aliases}
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    optimizer_state = {"state": {index[n]: v for n, v in named["state"].items()},
                       "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                        for g in named["param_groups"]]}
    return model_state, optimizer_state


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state in torch's format (what `full_state_dicts` saves, or an unsharded
    run's `optimizer.state_dict()`) into the optimizer of a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    named = {"state": {names[i]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
