"""`sgsd-fast export`: a training checkpoint as a peft adapter folder or a merged Hugging Face model folder.

    sgsd-fast export --checkpoint runs/x/checkpoint-20 --out out/adapter
    sgsd-fast export --checkpoint runs/x/checkpoint-20 --out out/merged --merge --dtype bfloat16
    sgsd-fast export --checkpoint runs/x/checkpoint-20 --out out/merged --merge --push_to_hub me/my-model

Both folders load with `transformers.AutoModelForCausalLM.from_pretrained(out)`; the merged one is
a plain model (config.json, model.safetensors, tokenizer) that needs neither peft nor sgsd_fast.
"""
from __future__ import annotations

import argparse

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug


def build_parser() -> argparse.ArgumentParser:
    from sgsd_fast.train.export import EXPORT_DTYPES

    parser = argparse.ArgumentParser(prog="sgsd-fast export", allow_abbrev=False, epilog=DEBUG_HELP,
                                     description="Write a checkpoint's model as an adapter folder, or merged into "
                                                 "its base as a plain Hugging Face model folder.")
    parser.add_argument("--checkpoint", metavar="DIR", required=True,
                        help="A checkpoint-<step> folder written by `sgsd-fast train`.")
    parser.add_argument("--out", metavar="DIR", required=True, help="Output folder (new or empty).")
    parser.add_argument("--merge", action="store_true",
                        help="Merge the LoRA adapter into the (unquantized) base and write the full model.")
    parser.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES,
                        help="Dtype of the written weights; 'auto' = the run's dtype field (float32 if that is "
                             "'auto'). Default: auto.")
    parser.add_argument("--push_to_hub", metavar="REPO", help="Also upload the folder to this Hub repository "
                        "('name' or 'owner/name'; needs a token, e.g. from `hf auth login`).")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, debug = split_debug(argv)
    ns = build_parser().parse_args(args)

    def body() -> None:
        from sgsd_fast.train.export import export_model

        export_model(ns.checkpoint, ns.out, merge=ns.merge, dtype=ns.dtype, push_to_hub=ns.push_to_hub,
                     private=ns.private)

    return run_command("sgsd-fast export", body, debug=debug)
