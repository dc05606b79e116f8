"""FSDP2 (`data_parallel: fsdp`, gloo, CPU, 2 processes) against one process on the same global batch.

One spawn of two ranks trains the tiny model sharded (`sgsd_fast.train.sharding`): SGSD with LoRA
(frozen teacher = adapter disabled) and with full fine-tuning (live teacher), OPSD with LoRA (the
teacher's gathered head kept across micro-batches), the LoRA run resumed from its checkpoint-1,
one step with gradient checkpointing and one with bfloat16 compute over float32 shards, then a
generate() whose ranks stop at different lengths. The model is built from a saved folder on every
rank, as `sgsd-fast train` does. The same runs in this process are the reference, plus this
process resuming the sharded runs' checkpoint-1 (a sharded checkpoint is an unsharded one).

Tolerance. Both sides use micro_batch_size and teacher_micro_batch_size 1, so every forward is one
unpadded rollout: with equal weights, each rollout's forward, loss and gradient are the same
operations on the same numbers in both runs (FSDP all-gathers exact copies of the weights). What
differs is how the eight per-rollout gradients are added (one process accumulates them in order;
FSDP reduce-scatters each micro-batch's pair of ranks and adds those) and that the gradient norm
is taken over shards. So, from equal weights, the rollouts and the loss (float64 sums of identical
float32 terms) must be equal, the gradient norm within GRAD_NORM_RTOL = 1e-6 (a few float32 ulps;
measured <= 7.7e-8), and the weights after the AdamW step within STEP_ATOL = lr / 1000 = 1e-5:
AdamW's update lr * m / (sqrt(v) + eps) moves steeply with g where |g| ~ eps, so an ulp of such an
entry's gradient becomes up to lr * ulp / (4 eps) of weight (measured after step 1: 6.3e-8 LoRA,
3.9e-7 full, 1.0e-8 OPSD; after step 2 from equal weights: 7.5e-8, 2.6e-8). Step 2 is checked from
equal weights by this process resuming the sharded run's checkpoint-1; the uninterrupted runs,
whose step 2 starts from weights already apart, are held to RUN_ATOL = lr / 100 (measured 1.2e-5,
2.8e-5). What a real error does, measured with a sharded run whose rank 1 contributed no
gradient: after one step the weights were up to 2.0e-2 off (2 lr: AdamW steps are ~lr * sign(g))
and more than 1e-5 off in 1077 LoRA and 23900 of 26976 full-model entries, and the gradient norm
was 26-35% lower. AdamW is scale-invariant, so a wrong
normalizer (a factor of the world size) would show only in the loss and gradient norm, which is
why those are compared tightly.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from test_distributed import ParityVerifier, bank, free_port, join_group, logged, make_cfg, train_rows

from sgsd_fast.models import LoraSettings, apply_lora, tiny_random_model, tiny_tokenizer
from sgsd_fast.train.checkpoint import load_model_weights
from sgsd_fast.train.trainer import Trainer

WORLD = 2
LR = 1e-2  # make_cfg's learning rate
STEP_ATOL = LR / 1000  # one AdamW step from equal weights
RUN_ATOL = LR / 100  # two steps, the second from weights STEP_ATOL apart
GRAD_NORM_RTOL = 1e-6
LORA = dict(use_peft=True, lora_r=2, lora_alpha=4, teacher_params="frozen")
FULL = dict(use_peft=False, teacher_params="live")
#: run name -> (method, config fields, the sharded run whose checkpoint-1 it resumes)
RUNS = {
    "lora": ("sgsd", LORA, None),
    "full": ("sgsd", FULL, None),
    "opsd_lora": ("opsd", {**LORA, "max_steps": 1}, None),
    "lora_resumed": ("sgsd", LORA, "lora"),
    "lora_checkpointing": ("sgsd", {**LORA, "gradient_checkpointing": True, "max_steps": 1}, None),
    "lora_bf16": ("sgsd", {**LORA, "dtype": "float32", "fsdp_param_dtype": "bfloat16", "max_steps": 1}, None),
}
COMPARED = ("lora", "full", "opsd_lora")  # also run in one process


def cfg_for(root: Path, side: str, name: str):
    """Run `name`'s config: run directory root/side/name, the bank and the saved tiny model under root."""
    method, fields, _ = RUNS[name]
    return make_cfg(root / side / name, root / "bank.json", method, model=str(root / "tiny"), micro_batch_size=1,
                    teacher_micro_batch_size=1, data_parallel="fsdp", **fields)


def shard_layout(model: torch.nn.Module) -> dict[str, tuple[str, int, int]]:
    """name -> (parameter type, rows this rank holds, rows in all)."""
    return {n: (type(p).__name__, p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0], p.shape[0])
            for n, p in model.named_parameters()}


def synced_generate(model: torch.nn.Module, rank: int) -> dict[str, list[int]]:
    """generate() on a sharded model whose ranks stop at different lengths: rank 0's one sequence ends
    at its first token (made the eos id), rank 1's runs on. Each forward is a collective, so without
    synced_gpus rank 1's next forward would wait for a rank 0 that has returned.

    The prompts are picked from greedy continuations that every rank computes on the same inputs
    (the same number of steps everywhere, so those calls are safe)."""
    candidates = [[40 + i, 50 + i, 60 + i] for i in range(8)]
    ids = torch.tensor(candidates)
    never = model.config.vocab_size  # an eos id no logit produces: these sequences all run 4 tokens
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                do_sample=False, eos_token_id=never, pad_token_id=0)[:, ids.shape[1]:].tolist()
    eos = greedy[0][0]
    other = next(i for i, g in enumerate(greedy) if eos not in g)
    mine = torch.tensor([candidates[0] if rank == 0 else candidates[other]])
    with torch.no_grad():
        out = model.generate(input_ids=mine, attention_mask=torch.ones_like(mine), max_new_tokens=4,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return {"generated": out[0, mine.shape[1]:].tolist(), "expected": greedy[0][:1] if rank == 0 else greedy[other]}


def _fsdp_worker(rank: int, port: int, root: str) -> None:
    dist = join_group(rank, port)
    try:
        root_path, info = Path(root), {}
        for name, (_, _, resumed_from) in RUNS.items():
            resume = root_path / "two" / resumed_from / "checkpoint-1" if resumed_from else None
            with Trainer(cfg_for(root_path, "two", name), verifier=ParityVerifier(), log=lambda s: None,
                         dist=dist, resume=resume) as trainer:
                trainer.train()
                info[name] = shard_layout(trainer.model)
        info.update(synced_generate(trainer.model, rank))
        torch.save(info, root_path / "two" / f"info-rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def spawn_within(seconds: float, fn, args) -> None:
    """mp.spawn that fails (and kills the ranks) instead of hanging when a collective never completes."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"the {WORLD} ranks did not finish within {seconds} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """(root, per-rank info): root/one/<run> in this process, root/two/<run> sharded over 2 ranks,
    root/resumed/<run> this process continuing root/two/<run>/checkpoint-1."""
    root = tmp_path_factory.mktemp("fsdp")
    bank(root / "bank.json")
    tok = tiny_tokenizer()
    tiny_random_model(tok, hidden_size=32, layers=2, seed=1).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "two").mkdir()
    spawn_within(240, _fsdp_worker, (free_port(), str(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in COMPARED:
            with Trainer(cfg_for(root, "one", name), verifier=ParityVerifier(), log=lambda s: None) as trainer:
                trainer.train()
            if RUNS[name][1].get("max_steps", 2) == 2:
                with Trainer(cfg_for(root, "resumed", name), verifier=ParityVerifier(), log=lambda s: None,
                             resume=root / "two" / name / "checkpoint-1") as trainer:
                    trainer.train()
    finally:
        torch.set_num_threads(threads)
    return root, [torch.load(root / "two" / f"info-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The weights of run/checkpoint-<step>, loaded into a fresh unsharded model: the whole state."""
    tok = tiny_tokenizer()
    model = tiny_random_model(tok, hidden_size=32, layers=2, seed=3)  # other weights: the checkpoint must win
    if (run / f"checkpoint-{step}" / "model" / "adapter_config.json").is_file():
        model = apply_lora(tiny_random_model(tok, hidden_size=32, layers=2, seed=1),
                           LoraSettings(r=LORA["lora_r"], alpha=LORA["lora_alpha"]))
    load_model_weights(model, run / f"checkpoint-{step}" / "model")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_diff(a: Path, b: Path, step: int) -> float:
    wa, wb = checkpoint_weights(a, step), checkpoint_weights(b, step)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def assert_same_step(a: dict, b: dict) -> None:
    """Two logged rows of one step taken from equal weights: see the module docstring."""
    for key in ("reward", "mask_tokens", "completion_length/mean", "completion_length/max", "skipped", "loss"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=GRAD_NORM_RTOL), (a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("name", COMPARED)
def test_sharded_step_equals_one_process(fsdp, name):
    root, info = fsdp
    one, two = train_rows(root / "one" / name), train_rows(root / "two" / name)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert_same_step(one[0], two[0])
    assert max_weight_diff(root / "one" / name, root / "two" / name, 1) <= STEP_ATOL
    # the same rollouts, scored and logged as in one process (the whole batch, gathered)
    assert (root / "one" / name / "completions.jsonl").read_text() == \
        (root / "two" / name / "completions.jsonl").read_text()
    # sharded for real: every parameter a DTensor of which rank 0 holds the first half of the rows
    for param, (kind, rows, total) in info[0][name].items():
        assert kind == "DTensor" and rows == -(-total // WORLD), param


@pytest.mark.parametrize("name", [n for n in COMPARED if RUNS[n][1].get("max_steps", 2) == 2])
def test_sharded_checkpoint_resumes_in_one_process_and_step_2_matches(fsdp, name):
    """checkpoint-1 of the sharded run holds the whole weights and torch's own optimizer state: one
    process continues it, and its step 2 (from the same weights) is the sharded run's step 2."""
    root, _ = fsdp
    resumed, two = train_rows(root / "resumed" / name), train_rows(root / "two" / name)
    assert resumed[0] == two[0]  # the history of the checkpoint
    assert_same_step(resumed[1], two[1])
    assert max_weight_diff(root / "resumed" / name, root / "two" / name, 2) <= STEP_ATOL
    # and the uninterrupted runs, whose step 2 starts from weights up to STEP_ATOL apart
    assert max_weight_diff(root / "one" / name, root / "two" / name, 2) <= RUN_ATOL


def test_sharded_resume_and_gradient_checkpointing_are_bit_exact(fsdp):
    """Resuming a sharded run (whole optimizer state loaded into the shards) and recomputing the
    activations in the backward change no bit of the sharded LoRA run."""
    root, _ = fsdp
    two = root / "two"
    lora = train_rows(two / "lora")
    assert logged(train_rows(two / "lora_resumed")) == logged(lora)
    assert [r["loss"] for r in train_rows(two / "lora_checkpointing")] == [lora[0]["loss"]]
    for other, step in (("lora_resumed", 2), ("lora_checkpointing", 1)):
        a, b = checkpoint_weights(two / "lora", step), checkpoint_weights(two / other, step)
        assert all(torch.equal(a[k], b[k]) for k in a), other


def test_bf16_compute_keeps_float32_shards(fsdp):
    """fsdp_param_dtype bfloat16: the step trains (finite loss, not skipped) and the shards, the
    optimizer state and the checkpoint stay float32. Its rollouts are sampled in bfloat16, so its
    numbers are not the float32 run's."""
    root, info = fsdp
    (row,) = train_rows(root / "two" / "lora_bf16")
    assert not row["skipped"] and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    saved = checkpoint_weights(root / "two" / "lora_bf16", 1)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    state = torch.load(root / "two" / "lora_bf16" / "checkpoint-1" / "optimizer.pt", weights_only=False)
    assert {t.dtype for s in state["state"].values() for k, t in s.items() if k != "step"} == {torch.float32}


def test_generate_on_a_sharded_model_with_ranks_stopping_apart(fsdp):
    _, info = fsdp
    assert len(info[0]["generated"]) == 1 and len(info[1]["generated"]) == 4
    for rank in range(WORLD):
        assert info[rank]["generated"] == info[rank]["expected"]
