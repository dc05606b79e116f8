"""`sgsd-fast plan`: expected peak GPU memory of a training run, by component, and the longest rollout that fits.

    sgsd-fast plan --model Qwen/Qwen3-1.7B --gpu_memory_gb 24 --max_new_tokens 4096
    sgsd-fast plan --config configs/paper_qwen3_1p7b.yaml --gpu_memory_gb 24
    sgsd-fast plan --model Qwen/Qwen3-8B --load_in_4bit --gradient_checkpointing --json

Built from the model's config alone (the built-in table, a local config.json or folder, or a cached
Hugging Face config): no weights are read or downloaded. The memory-relevant fields of
`sgsd-fast train` are accepted under the same names (and YAML files), validated the same way; the
others are ignored. The model behind the numbers: `sgsd_fast.train.plan`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug
from sgsd_fast.config import add_config_arguments


def build_parser() -> argparse.ArgumentParser:
    from sgsd_fast.train.plan import PLAN_FIELDS

    parser = argparse.ArgumentParser(
        prog="sgsd-fast plan", allow_abbrev=False, epilog=DEBUG_HELP,
        description="Print the expected peak memory of a training run by component (weights, adapter, optimizer "
                    "state, activations, KV cache, loss workspace, teachers), whether it fits the card, and the "
                    "largest max_new_tokens that does. From the model config alone; nothing is downloaded.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of `sgsd-fast train` config fields (those "
                        "that do not change memory are ignored).")
    parser.add_argument("--gpu_memory_gb", type=float, default=24.0, metavar="GIB",
                        help="Memory of the card in GiB (2**30 bytes, as nvidia-smi's MiB / 1024). Default: 24.")
    parser.add_argument("--prompt_length", type=int, default=256, metavar="INT",
                        help="Tokens of the longest student prompt. Default: 256.")
    parser.add_argument("--teacher_prompt_length", type=int, default=None, metavar="INT",
                        help="Tokens of the longest teacher prompt (default: 3 x prompt_length).")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    add_config_arguments(parser, only=PLAN_FIELDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, debug = split_debug(argv)
    ns = build_parser().parse_args(args)
    return run_command("sgsd-fast plan", lambda: _plan(ns), debug=debug)


def _plan(ns: argparse.Namespace) -> None:
    from sgsd_fast.config import DEPRECATED_FIELDS, canonical_fields, check_field_names, read_yaml
    from sgsd_fast.train.plan import PLAN_FIELDS, estimate, format_plan, largest_rollout, plan_settings
    from sgsd_fast.train.shapes import resolve_model_shape

    values = canonical_fields(read_yaml(ns.config)) if ns.config else {}
    # plan_settings keeps only the memory-relevant fields: a misspelt one must not vanish silently.
    check_field_names(values, where=f"--config {ns.config!r}: ")
    flags = set(PLAN_FIELDS) | set(DEPRECATED_FIELDS)  # an old flag name is renamed, with its warning
    values.update(canonical_fields({k: v for k, v in vars(ns).items() if k in flags}))
    settings = plan_settings(values, prompt_length=ns.prompt_length, teacher_prompt_length=ns.teacher_prompt_length,
                             gpu_memory_gb=ns.gpu_memory_gb)
    shape = resolve_model_shape(settings.cfg.model)
    plan = estimate(shape, settings)
    longest = largest_rollout(shape, settings)
    if ns.json:
        out = plan.to_dict()
        out["largest_max_new_tokens"], out["largest_is_context_limit"] = longest
        out["shape"] = dataclasses.asdict(shape)
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, longest))
