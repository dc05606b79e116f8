"""The long-context step extrapolated to all 28 layers of Qwen3-1.7B on a 24 GB card: an estimate.

Nothing here is measured on a GPU. Ours is `sgsd-fast plan` (`sgsd_fast.train.plan.estimate`,
validated on CPU against resident memory within -3.8 % / +5.4 % at the peak) for the paper's
configuration (configs/paper_qwen3_1p7b.yaml: bf16 base, LoRA r=64 on all linear projections,
paged 8-bit AdamW, gradient checkpointing, K=8 teachers) with micro-batches of 4 rollouts (the
paper's) and of 1 (what a long-context run would use), at each rollout length T, and the longest T
whose update fits the card. The reference approach (K student passes, full log-softmaxes) is the same plan
with the fused loss workspace of the update replaced by full-vocabulary tensors of the micro-batch's
tokens, bracketed by two per-token costs:

- low: one fp32 [tokens, V] matrix (the least any unfused log-softmax holds: 0.58 MiB per token at
  V=151,936), what the plan itself reports as `naive_logits_bytes`;
- high: how much faster per token the reference step grew than ours, measured at Qwen3 width on
  CPU in fp32 (benchmarks/results/long_context/long_context.json, lines over the lengths both ran:
  ~1.73 MiB).

Both count only the update phase's loss moments (the logits live through the loss and its backward,
not through the decoder blocks' backward). Generation (the 16 rollouts' KV cache) is the same for
both and is shown on its own: for long rollouts it, not the update, is what a 24 GB card runs out of
first at generation_batch_size=16.

The plan counts what torch's allocator holds; the reference bracket is the plan plus a per-token
cost, so both inherit the plan's assumptions (sgsd_fast/train/plan.py) and neither is a GPU number.

    python -m benchmarks.long_context_28_layers > benchmarks/results/long_context/long_context_28_layers.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.long_context import fit
from sgsd_fast.config import canonical_fields, read_yaml
from sgsd_fast.train.plan import CUDA_CONTEXT_BYTES, FRAGMENTATION, estimate, plan_settings
from sgsd_fast.train.shapes import resolve_model_shape

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 2**20, 2**30
LOSS_MOMENTS = ("loss forward", "loss backward")


def phase_total(static: int, phase: int) -> int:
    """Bytes of a phase as the plan totals its peak phase: static + phase + its margin + the context."""
    return int(static + phase * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES)


def update_total(static: int, moments: dict[str, int], loss_extra: int) -> int:
    """`phase_total` of the update, with `loss_extra` added to the loss moments only."""
    return phase_total(static, max(b + (loss_extra if name in LOSS_MOMENTS else 0) for name, b in moments.items()))


def measured_excess(measured: Path) -> float:
    """MiB per rollout token that the reference step grows faster than ours, from lines fitted over
    the lengths both were measured at (there ours is flat, so this is the logits' cost alone)."""
    records = json.loads(measured.read_text())["records"]
    by = {impl: {r["t"]: r["peak_mib"] for r in records if r["impl"] == impl} for impl in ("ours", "naive")}
    common = sorted(set(by["ours"]) & set(by["naive"]))
    if len(common) < 2:
        raise SystemExit(f"{measured}: ours and naive share fewer than two measured lengths")
    slope = {impl: fit([(t, by[impl][t]) for t in common])[1] for impl in by}
    return slope["naive"] - slope["ours"]


class Model:
    """The plan of one configuration at any rollout length, ours and the reference approach."""

    def __init__(self, config: Path, measured: Path, gib: float, micro_batch: int | None):
        values = canonical_fields(read_yaml(config))
        if micro_batch is not None:
            values["micro_batch_size"] = micro_batch
        self.settings = plan_settings(values, gpu_memory_gb=gib)
        self.shape = resolve_model_shape(self.settings.cfg.model)
        self.per_token = {"naive_low": self.shape.vocab_size * 4, "naive_high": measured_excess(measured) * MiB}
        self.budget = int(gib * GiB)

    def row(self, t: int) -> dict:
        plan = estimate(self.shape, self.settings, max_new_tokens=t)
        moments, fused = plan.details["update_moments"], plan.details["fused_loss_bytes"]
        tokens = self.settings.cfg.micro_batch_size * t  # completion tokens of one micro-batch: what the loss sees
        out = dict(t=t, ours_update=update_total(plan.static_bytes, moments, 0),
                   generation=phase_total(plan.static_bytes, plan.phases["generation"]))
        for key, per in self.per_token.items():
            out[key] = update_total(plan.static_bytes, moments, int(tokens * per) - fused)
        return out

    def longest(self, key: str, step: int = 256, limit: int = 40960) -> str:
        """The longest multiple of `step` up to `limit` (Qwen3's context) whose `key` total fits."""
        lo, hi = 0, limit // step
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.row(mid * step)[key] <= self.budget else (lo, mid - 1)
        return f"> {limit:,} (context)" if lo == limit // step else f"{lo * step:,}" if lo else f"< {step}"


def render(model: Model, lengths: list[int]) -> str:
    cfg, gib = model.settings.cfg, model.settings.gpu_memory_gb
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = [f"### micro-batches of {cfg.micro_batch_size} rollout(s)", "",
             "| rollout T | ours: update GiB | reference: update GiB (low - high) | generation GiB (both) |",
             "|---|---|---|---|"]
    for r in map(model.row, lengths):
        lines.append(f"| {r['t']:,} | {g(r['ours_update'])} | {g(r['naive_low'])} - {g(r['naive_high'])} | "
                     f"{g(r['generation'])} |")
    lines += ["", f"Longest T (multiple of 256) whose update fits {gib:g} GiB: **ours {model.longest('ours_update')}**; "
              f"reference {model.longest('naive_high')} (high) to {model.longest('naive_low')} (low). Generation of "
              f"{cfg.generation_batch_size} rollouts at a time fits up to {model.longest('generation')} (the same for both; "
              "a smaller generation_batch_size lowers it without touching the update)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "paper_qwen3_1p7b.yaml")
    parser.add_argument("--measured", type=Path, default=ROOT / "benchmarks/results/long_context/long_context.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--micro_batches", type=int, nargs="+", default=[4, 1],
                        help="micro_batch_size values to plan (4 is the paper's)")
    parser.add_argument("--gpu_memory_gb", type=float, default=24.0)
    args = parser.parse_args()
    models = [Model(args.config, args.measured, args.gpu_memory_gb, m) for m in args.micro_batches]
    m0 = models[0]
    cfg = m0.settings.cfg
    print(f"## 28 layers on a {args.gpu_memory_gb:g} GiB card: an estimate, not a measurement\n\n"
          f"{cfg.model}, {args.config.name}: LoRA r={cfg.lora_r}, gradient checkpointing, {cfg.optim}, "
          f"K={cfg.num_teachers} teachers, {cfg.prompts_per_step * cfg.num_generations} rollouts per step. GiB totals "
          "include the plan's 0.5 GiB CUDA context and 10 % margin. Reference approach: the update's loss moments "
          f"with the micro-batch's full-vocabulary tensors at {m0.per_token['naive_low'] / MiB:.2f} (one fp32 logit "
          f"matrix) to {m0.per_token['naive_high'] / MiB:.2f} MiB per token (growth measured at this width on CPU, "
          "fp32) in place of the fused loss workspace.\n")
    print("\n".join(render(m, args.lengths) for m in models), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
