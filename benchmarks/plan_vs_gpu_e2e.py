"""The `sgsd-fast plan` estimate of the gpu-e2e step next to what `sgsd-fast bench --preset gpu-e2e` measured.

    python -m benchmarks.plan_vs_gpu_e2e gpu-check-out        # reads gpu-check-out/gpu-e2e.json if present

gpu_check.sh runs this after the gpu-e2e bench and appends the table to gpu_check.md. The plan is
made for the preset's own configuration (`sgsd_fast.bench.presets`, so the two cannot drift): full
fine-tuning with torch AdamW in the preset's dtype, gradient checkpointing, K teachers with live
weights, one rollout, and no padding mask (the bench passes none, so SDPA runs causal with GQA,
which the plan models as flash-style attention). Two differences are taken out of the comparison:
the bench generates nothing (no KV-cache phase) and steps AdamW with foreach=False (no foreach
sqrt(v) buffer), so the planned peak here is static + the largest teacher / backward moment.

Measured: torch.cuda.max_memory_allocated during a step plus what was allocated before it, and the
longest rollout whose step fits the allocator capped at the budget (set_per_process_memory_fraction:
fragmentation counts, the CUDA context does not). Under SGSD_BENCH_DRYRUN=1 both are the preset's
tiny CPU shapes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 2**20


def main(argv: list[str]) -> int:
    from sgsd_fast.bench.e2e import model_config
    from sgsd_fast.bench.presets import get_preset
    from sgsd_fast.train.plan import FRAGMENTATION, GiB, estimate, plan_settings
    from sgsd_fast.train.shapes import shape_from_config

    out = Path(argv[0]) if argv else Path("gpu-check-out")
    preset = get_preset("gpu-e2e")
    case = preset.e2e[0]
    cfg = case.cfg
    config = model_config(cfg.model)
    if cfg.vocab_size is not None:
        config.vocab_size = cfg.vocab_size
    shape = shape_from_config(config, cfg.model)
    settings = plan_settings({"use_peft": False, "optim": "adamw_torch", "dtype": cfg.dtype, "device": preset.device,
                              "gradient_checkpointing": cfg.grad_ckpt, "num_teachers": cfg.k, "teacher_params": "live",
                              "prompts_per_step": cfg.batch, "micro_batch_size": cfg.batch,
                              "teacher_micro_batch_size": cfg.batch, "generation_batch_size": cfg.batch,
                              "num_eval_problems": 1, "attn_implementation": "flash_attention_2"},
                             prompt_length=cfg.prompt_len, teacher_prompt_length=cfg.prompt_len + cfg.teacher_extra,
                             gpu_memory_gb=case.budget_bytes / GiB)

    def planned(t: int) -> int:
        plan = estimate(shape, settings, max_new_tokens=t)
        moments = {m: b for m, b in plan.details["update_moments"].items() if m != "optimizer step"}
        return plan.static_bytes + max(plan.phases.get("teachers", 0), max(moments.values()))

    def longest(margin: float) -> int:
        lo, hi = case.t_range
        fits = [t for t in range(lo, hi + 1, case.multiple) if planned(t) * (1 + margin) <= case.budget_bytes]
        return max(fits, default=0)

    measured = {}
    results = out / "gpu-e2e.json"
    if results.is_file():
        records = json.loads(results.read_text()).get("records", [])
        measured = next((r for r in records if r.get("bench") == "e2e_step" and r.get("impl") == "ours"), {})
    got = lambda key, fmt: fmt.format(measured[key]) if key in measured else "not measured"  # noqa: E731
    print(f"## Plan vs measured: gpu-e2e step ({cfg.model}, K={cfg.k}, {cfg.dtype}, budget "
          f"{case.budget_bytes / GiB:.2f} GiB)\n")
    print("| quantity | plan | measured |\n|---|---|---|")
    print(f"| peak memory at T={case.t} (MiB) | {planned(case.t) / MIB:.0f} | {got('peak_mib', '{:.0f}')} |")
    print(f"| planned peak at the cap T={case.t_range[1]} (MiB) | {planned(case.t_range[1]) / MIB:.0f} | - |")
    print(f"| longest T in the budget, multiple of {case.multiple} (cap {case.t_range[1]}) | {longest(0.0)} "
          f"({longest(FRAGMENTATION)} with the {FRAGMENTATION:.0%} margin) | {got('max_t', '{}')}"
          f"{' (cap)' if measured.get('capped') else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
