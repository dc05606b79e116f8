"""End-to-end SGSD optimizer step: ours vs the naive step of the public reference code.

One step = K teacher passes (the same network, no grad, each with its own longer teacher prompt)
+ student forward/backward + gated loss + optimizer step, on random token ids and a randomly
initialized model built from a config in code (no download).

- ours: decoder last hidden state -> ops.teacher_logprobs for the K teachers (lazily, one
  teacher forward at a time, each reduced at once to a length-T vector), one student pass ->
  ops.sgsd_loss -> backward.
- naive: per teacher row k, the teacher's full-vocab fp32 log-softmax [B, T, V] and a student
  forward+backward with its own full fp32 log-softmax (K student passes in all), the loss split
  per teacher with `naive.gated_terms`. Rows run one at a time (micro-batch of one row), the
  lowest-memory way to run that code, so the memory comparison is not against a strawman.
Both steps compute the same loss and gradients (up to rounding); the loss values are cross-checked.

Memory of a step = what is live before it (weights, optimizer state) + the extra peak of the step
(`measure.peak_mib`). The longest rollout that fits a budget is found by bisection on T.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from sgsd_fast.bench import measure, naive

GiB = 2**30


@dataclass(frozen=True)
class E2EConfig:
    """A model config (built in code) and the shape of one SGSD step."""

    model: str = "tiny-llama"  # "tiny-llama" | "qwen3-1.7b"
    k: int = 8
    batch: int = 1
    prompt_len: int = 64  # student prompt tokens
    teacher_extra: int = 128  # extra tokens of each teacher prompt (skill + mistake notes)
    dtype: str = "float32"
    grad_ckpt: bool = False
    vocab_size: int | None = None  # overrides the model's vocabulary (smaller = faster tests)
    layers: int | None = None  # overrides the number of decoder layers (real width, fewer layers)


def model_config(name: str):
    """A transformers config for `name`: the tiny Llama used on CPU or Qwen3-1.7B's shape."""
    from transformers import LlamaConfig, Qwen3Config

    # initializer_range is raised above the default 0.02 so that the random model's next-token
    # distributions are far from uniform and teachers with different prompts disagree with the
    # student: with near-uniform outputs every teacher's polarity is 0 and the loss is exactly 0.
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                           tie_word_embeddings=True, initializer_range=0.3)
    if name == "qwen3-1.7b":
        return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                           max_position_embeddings=65536, tie_word_embeddings=True, initializer_range=0.05)
    raise ValueError(f"model must be 'tiny-llama' or 'qwen3-1.7b', got {name!r}")


def build_model(cfg: E2EConfig, device: torch.device) -> torch.nn.Module:
    """Randomly initialized causal LM of `cfg.model`, in `cfg.dtype`, in train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = model_config(cfg.model)
    if cfg.vocab_size is not None:
        config.vocab_size = cfg.vocab_size
    if cfg.layers is not None:
        config.num_hidden_layers = cfg.layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:cfg.layers]
    config._attn_implementation = "sdpa"
    # Built in the default dtype, then cast: older transformers take no dtype argument here.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, cfg.dtype))
    measure.free_memory(device)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable()
    return model.train()


@dataclass
class StepBatch:
    """Token ids of one step: student input, K teacher inputs, sampled ids and SGSD side inputs."""

    student_ids: torch.Tensor  # [B, P + T]
    teacher_ids: list[torch.Tensor]  # K x [B, P + extra + T]
    targets: torch.Tensor  # [B, T]: the completion ids, the last T tokens of every input
    mask: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B]
    teacher_weights: torch.Tensor  # [B, K]


def make_batch(cfg: E2EConfig, t: int, vocab: int, device: torch.device, seed: int = 0) -> StepBatch:
    """Random prompts and a shared random completion of length t; half the rollouts succeed."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.randint(0, vocab, (cfg.batch, t), generator=g)
    prompt = torch.randint(0, vocab, (cfg.batch, cfg.prompt_len), generator=g)
    teacher_ids = []
    for _ in range(cfg.k):
        notes = torch.randint(0, vocab, (cfg.batch, cfg.teacher_extra), generator=g)
        teacher_ids.append(torch.cat([notes, prompt, completion], dim=1).to(device))
    return StepBatch(
        student_ids=torch.cat([prompt, completion], dim=1).to(device),
        teacher_ids=teacher_ids,
        targets=completion.to(device),
        mask=(torch.rand(cfg.batch, t, generator=g) > 0.05).to(device),
        rewards=(torch.arange(cfg.batch) % 2 == 0).float().to(device),
        teacher_weights=torch.softmax(torch.randn(cfg.batch, cfg.k, generator=g), dim=-1).to(device),
    )


def _completion_slice(x: torch.Tensor, t: int) -> torch.Tensor:
    # Position j predicts token j + 1, so the T completion tokens are predicted by [-T-1, -1).
    return x[:, -t - 1 : -1]


def ours_step(model: torch.nn.Module, opt: torch.optim.Optimizer, b: StepBatch) -> float:
    """One SGSD step with the fused ops; returns the loss."""
    from sgsd_fast import ops

    t = b.targets.shape[1]
    weight = model.get_output_embeddings().weight
    decoder = model.get_decoder()

    def teacher_hidden() -> Iterator[torch.Tensor]:
        with torch.no_grad():
            for ids in b.teacher_ids:
                yield _completion_slice(decoder(input_ids=ids, use_cache=False).last_hidden_state, t)

    teacher_logp = ops.teacher_logprobs(teacher_hidden(), weight.detach(), b.targets)
    hidden = _completion_slice(decoder(input_ids=b.student_ids, use_cache=False).last_hidden_state, t)
    loss, _ = ops.sgsd_loss(hidden, weight, b.targets, teacher_logp, b.mask, b.rewards, b.teacher_weights)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def naive_step(model: torch.nn.Module, opt: torch.optim.Optimizer, b: StepBatch) -> float:
    """One SGSD step the reference way (module docstring); returns the loss."""
    t, k_total = b.targets.shape[1], len(b.teacher_ids)
    total = 0.0
    for k in range(k_total):
        with torch.no_grad():
            teacher_logits = model(input_ids=b.teacher_ids[k], use_cache=False).logits
            teacher_logsm = torch.log_softmax(_completion_slice(teacher_logits, t).float(), -1)
            del teacher_logits
        student_logits = _completion_slice(model(input_ids=b.student_ids, use_cache=False).logits, t)
        student_logsm = torch.log_softmax(student_logits.float(), -1)
        terms = naive.gated_terms(naive.gather_ids(student_logsm, b.targets),
                                  naive.gather_ids(teacher_logsm, b.targets)[:, None], b.mask,
                                  b.rewards, b.teacher_weights[:, k : k + 1])
        loss_k = terms.sum() / b.targets.shape[0]
        loss_k.backward()
        total += float(loss_k.detach())
        del teacher_logsm, student_logits, student_logsm, terms, loss_k
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


STEPS: dict[str, Callable[[torch.nn.Module, torch.optim.Optimizer, StepBatch], float]] = {
    "ours": ours_step,
    "naive": naive_step,
}


def _static_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> int:
    # What is live between steps; CUDA counts it directly, on CPU it is summed from the tensors.
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    tensors = list(model.parameters()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(x.numel() * x.element_size() for x in tensors)


class StepBench:
    """A model + optimizer pair for one implementation, reused across rollout lengths."""

    def __init__(self, cfg: E2EConfig, impl: str, device: torch.device):
        self.cfg, self.impl, self.device = cfg, impl, device
        self.model = build_model(cfg, device)
        self.vocab = self.model.config.vocab_size
        # foreach=False: the multi-tensor path would add a temporary copy of all gradients.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, foreach=False)
        self.step = STEPS[impl]
        # One step up front so the optimizer state exists: later steps are steady-state steps.
        self.call(self.batch(8))

    def batch(self, t: int) -> StepBatch:
        return make_batch(self.cfg, t, self.vocab, self.device)

    def call(self, b: StepBatch) -> float:
        """One optimizer step on `b`; returns its loss."""
        return self.step(self.model, self.opt, b)

    def peak_mib(self, b: StepBatch) -> float:
        """Total peak memory of one step: what is live before it + the step's extra peak."""
        static = _static_bytes(self.model, self.opt, self.device)
        return static / 2**20 + measure.peak_mib(lambda: self.call(b), self.device)

    def fits(self, t: int, budget_bytes: int) -> bool:
        """Whether one step at rollout length t stays within the budget (an OOM counts as no).

        On CUDA the allocator is capped at the budget while probing, so a step that would need
        more fails fast (and fragmentation counts, as it would on a card of that size).
        """
        if self.device.type == "cuda":
            measure.free_memory(self.device)  # cached blocks of earlier steps must not count against the cap
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), self.device)
        try:
            return self.peak_mib(self.batch(t)) * 2**20 <= budget_bytes
        except Exception as err:  # noqa: BLE001 - only out-of-memory is an answer, anything else is a bug
            if not measure.is_oom(err):
                raise
            self.opt.zero_grad(set_to_none=True)
            return False
        finally:
            measure.free_memory(self.device)
            if self.device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)


def max_rollout(bench: StepBench, budget_bytes: int, *, lo: int, hi: int, multiple: int) -> dict:
    """Largest T (a multiple of `multiple`, within [lo, hi]) whose step fits `budget_bytes`, by bisection.

    Returns {"max_t": T or 0 if even lo does not fit, "capped": True when hi itself fits, "probes"}.
    """
    if not bench.fits(lo, budget_bytes):
        return {"max_t": 0, "capped": False, "probes": 1}
    if bench.fits(hi, budget_bytes):
        return {"max_t": hi, "capped": True, "probes": 2}
    good, bad, probes = lo, hi, 2
    while bad - good > multiple:
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        probes += 1
        if bench.fits(mid, budget_bytes):
            good = mid
        else:
            bad = mid
    return {"max_t": good, "capped": False, "probes": probes}


def run_e2e(cfg: E2EConfig, device: torch.device, *, t: int, budget_bytes: int | None, t_range: tuple[int, int],
            multiple: int, impls: tuple[str, ...] = ("ours", "naive"), repeat: int = 2,
            max_seconds: float = 20.0) -> list[dict]:
    """Step time and memory at rollout length t, plus the longest T under the budget, for each impl.

    On CPU both implementations live side by side and are timed interleaved (the CPU is shared,
    see `measure`); on CUDA one at a time, so the allocator's live bytes are that one's alone.
    """
    records = []
    for group in [impls] if device.type == "cpu" else [(impl,) for impl in impls]:
        records += _run_group(cfg, device, group, t=t, budget_bytes=budget_bytes, t_range=t_range,
                              multiple=multiple, repeat=repeat, max_seconds=max_seconds)
        measure.free_memory(device)  # the group's models are unreferenced once it returns
    return records


def _run_group(cfg: E2EConfig, device: torch.device, impls: tuple[str, ...], *, t: int, budget_bytes: int | None,
               t_range: tuple[int, int], multiple: int, repeat: int, max_seconds: float) -> list[dict]:
    recs = {impl: {"bench": "e2e_step", "impl": impl, "device": device.type, **asdict(cfg), "t": t,
                   "budget_mib": None if budget_bytes is None else budget_bytes / 2**20, "status": "ok"}
            for impl in impls}
    benches: dict[str, StepBench] = {}
    batches: dict[str, StepBatch] = {}
    for impl in impls:
        try:
            bench = StepBench(cfg, impl, device)
            batches[impl] = bench.batch(t)
            recs[impl]["loss"] = bench.call(batches[impl])  # warm-up at this T, kept for the cross-check
            benches[impl] = bench
        except Exception as err:  # noqa: BLE001 - recorded in the results instead of aborting the preset
            recs[impl].update(measure.failure(err))
            measure.free_memory(device)
    fns = {impl: (lambda bench=bench, b=batches[impl]: bench.call(b)) for impl, bench in benches.items()}
    for impl, timing in measure.time_interleaved(fns, device, repeat=repeat, max_seconds=max_seconds).items():
        if isinstance(timing, dict):
            recs[impl].update(timing)
            continue
        recs[impl]["time_ms"] = timing[0]
        try:
            recs[impl]["peak_mib"] = benches[impl].peak_mib(batches[impl])
            if budget_bytes is not None:
                recs[impl].update(max_rollout(benches[impl], budget_bytes, lo=t_range[0], hi=t_range[1],
                                              multiple=multiple))
        except Exception as err:  # noqa: BLE001 - as above
            recs[impl].update(measure.failure(err))
        measure.free_memory(device)
    return list(recs.values())
