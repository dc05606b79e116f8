"""`sgsd-fast skills ...`: build, inspect, export/import and diff skill banks.

This is the wiring of the cold start: the skill-bank library (`sgsd_fast.skills`) never touches the
model stack; this command brings the loader, a rollout engine and the verifier to it, imported
lazily inside `build`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug
from sgsd_fast.config import coerce_field
from sgsd_fast.skills.items import FIELDS, SkillItem
from sgsd_fast.skills.store import SkillBank, kind_counts, remove_bank_files

_PROG = "sgsd-fast skills"


def _spellings(name: str) -> tuple[str, str]:
    """`--name` as the other commands spell it, and the dashed `--na-me` this command used first."""
    return f"--{name}", f"--{name.replace('_', '-')}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="Build, inspect, import/export and diff skill banks "
                                     "(one SQLite file per bank; every update is a new version).", epilog=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    build = sub.add_parser("build", help="cold start: attempt problems, verify, extract notes, merge (resumable)",
                           description="Build a static bank from the model's own verified attempts (SPEC §4). "
                           "Interrupted builds resume when rerun with the same --out and --data.")
    # The same spellings as `sgsd-fast train` (underscores; the older dashed ones still work).
    build.add_argument("--model", "--model_name_or_path", default="smollm2",
                       help="model for attempts and extraction (default: smollm2)")
    build.add_argument("--data", "--dataset", default="builtin:256",
                       help="problems: builtin:N (the built-in task) or a JSONL/parquet/HF dataset source")
    build.add_argument("--split", "--dataset_split", default="train", help="split of --data to use (default: train)")
    build.add_argument("--dataset_config", default=None, help="configuration name of a Hub dataset (e.g. 'main')")
    build.add_argument("--problem_field", default="problem",
                       help="dotted path of the problem text in each row (default: problem)")
    build.add_argument("--answer_field", default="answer",
                       help="dotted path of the reference answer in each row (default: answer)")
    build.add_argument("--limit", "--dataset_limit", type=int, default=None,
                       help="use at most this many problems of a dataset source")
    build.add_argument("--out", required=True, help="bank file to create (or to resume)")
    build.add_argument("--seed", type=int, default=0, help="problem-generation and sampling seed")
    build.add_argument(*_spellings("answer_phrase"), nargs="?", const=True, default=False,
                       type=lambda v: coerce_field("answer_phrase", v), metavar="true|false",
                       help="also accept an 'answer is ...' phrase as the stated answer (for small models that "
                            "never write \\boxed{}; SPEC §5 is strict without it); a bare flag means true")
    build.add_argument(*_spellings("max_new_tokens"), type=int, default=512,
                       help="attempt length (sampled, temperature 1.0)")
    build.add_argument(*_spellings("extract_max_new_tokens"), type=int, default=384,
                       help="extraction reply length (greedy)")
    build.add_argument(*_spellings("merge_max_new_tokens"), type=int, default=1024,
                       help="merge reply length (greedy)")
    build.add_argument(*_spellings("batch_size"), type=int, default=16, help="prompts generated together")
    build.add_argument(*_spellings("group_size"), type=int, default=32, help="notes per merge call")
    build.add_argument("--device", default="auto", help="model device (default: auto)")
    build.add_argument("--dtype", "--torch_dtype", default="auto", help="model dtype (default: auto)")
    build.add_argument(*_spellings("no_progress"), action="store_true", help="hide progress bars")

    show = sub.add_parser("show", help="print the items of a bank")
    show.add_argument("bank", help="bank file")
    show.add_argument("--kind", choices=("skill", "mistake"), help="only this kind")
    show.add_argument("--origin", choices=("static", "dynamic"), help="only this origin")
    show.add_argument("--version", type=int, default=None, help="items as of this version (default: latest)")
    show.add_argument("--json", action="store_true", help="print JSON records instead of text")

    stats = sub.add_parser("stats", help="counts per kind and origin, and the version history")
    stats.add_argument("bank", help="bank file")

    export = sub.add_parser("export", help="write a bank (or one version of it) as JSON")
    export.add_argument("bank", help="bank file")
    export.add_argument("--out", default=None, help="output file (default: stdout)")
    export.add_argument("--version", type=int, default=None, help="export this version (default: latest)")

    imp = sub.add_parser("import", help="add the items of a JSON bank to a bank file (one new version)")
    imp.add_argument("source", help="JSON file in the exchange format (see sgsd_fast.skills.store)")
    imp.add_argument("bank", help="bank file (created when absent)")
    imp.add_argument("--origin", choices=("static", "dynamic"), default="static",
                     help="origin for items that do not state one (default: static)")
    imp.add_argument("--replace", action="store_true", help="remove every current item first")

    diff = sub.add_parser("diff", help="items added, removed and changed between two versions")
    diff.add_argument("bank", help="bank file")
    diff.add_argument("v1", type=int, help="older version (0 = empty bank)")
    diff.add_argument("v2", type=int, help="newer version")
    return parser


def _headline(item: SkillItem) -> str:
    return item.fields["title"] if item.kind == "skill" else item.fields["description"]


def _print_item(item: SkillItem) -> None:
    print(f"[{item.kind}] {item.id} ({item.origin})")
    for name in FIELDS[item.kind]:
        print(f"  {name}: {item.fields[name]}")


def _cmd_show(args: argparse.Namespace) -> int:
    with SkillBank(args.bank, read_only=True) as bank:
        items = bank.items(args.kind, origin=args.origin, version=args.version)
    if args.json:
        print(json.dumps([{"kind": item.kind, **item.to_record()} for item in items], indent=2, ensure_ascii=False))
    else:
        for item in items:
            _print_item(item)
        print(f"{len(items)} items")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with SkillBank(args.bank, read_only=True) as bank:
        items, versions, version = bank.items(), bank.versions(), bank.version
    print(f"bank: {args.bank}")
    print(f"version: {version}")
    for kind, total in kind_counts(items).items():
        by_origin = ", ".join(f"{o} {sum(i.kind == kind and i.origin == o for i in items)}"
                              for o in ("static", "dynamic"))
        print(f"{kind}s: {total} ({by_origin})")
    print("history:")
    for v in versions:
        print(f"  v{v.version}  {v.created}  {v.n_skills} skills, {v.n_mistakes} mistakes  {v.message}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with SkillBank(args.bank, read_only=True) as bank:
        data = bank.export_json(args.out, version=args.version)
    if args.out is None:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(f"wrote {len(data['skills'])} skills and {len(data['mistakes'])} mistakes to {args.out}", file=sys.stderr)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    new_file = not Path(args.bank).exists()
    try:
        with SkillBank(args.bank) as bank:
            report = bank.import_json(args.source, default_origin=args.origin, replace=args.replace)
    except BaseException:
        if new_file:  # an empty bank left behind would look like a successful, empty import
            remove_bank_files(args.bank)
        raise
    print(f"imported {report.added} items into {args.bank} (version {report.version})")
    for item_id, reason in report.skipped:
        print(f"skipped {item_id}: {reason}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    with SkillBank(args.bank, read_only=True) as bank:
        d = bank.diff(args.v1, args.v2)
    for item in d.added:
        print(f"+ [{item.kind}] {item.id}: {_headline(item)}")
    for item in d.removed:
        print(f"- [{item.kind}] {item.id}: {_headline(item)}")
    for old, new in d.changed:
        print(f"~ [{new.kind}] {new.id}: {_headline(old)} -> {_headline(new)}")
    print(f"v{d.old_version} -> v{d.new_version}: {len(d.added)} added, {len(d.removed)} removed, "
          f"{len(d.changed)} changed")
    return 0


def load_build_problems(data: str, *, seed: int = 0, split: str = "train", limit: int | None = None,
                        problem_field: str = "problem", answer_field: str = "answer",
                        config: str | None = None) -> list[Any]:
    """Problems for `build --data`: ``builtin:N`` is the built-in task, anything else a dataset source
    read with the given fields (a DAPO-style parquet: ``--problem_field prompt
    --answer_field reward_model.ground_truth``)."""
    from sgsd_fast.data import generate_problems, load_problems

    if data.startswith("builtin:"):
        count = data.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--data builtin:N needs a positive integer N, got {data!r}")
        return generate_problems(int(count), seed=seed, split=split)
    return load_problems(data, split=split, limit=limit, problem_field=problem_field, answer_field=answer_field,
                         config=config)


def model_callables(model: Any, tokenizer: Any, *, max_new_tokens: int, extract_max_new_tokens: int,
                    merge_max_new_tokens: int, batch_size: int = 16, seed: int = 0
                    ) -> dict[str, Callable[..., Any]]:
    """`build_bank`'s model callables from a HF model and tokenizer, as keyword arguments:
    ``generate_fn``, ``extractor_fn``, ``merge_fn`` and ``render_fn``.

    Attempts sample at temperature 1.0 with a seed derived from the batch's prompts (so a resumed
    build samples what the uninterrupted one would have); extraction and merging decode greedily,
    each with its own length limit (merge replies list up to a whole group of notes).
    """
    from sgsd_fast.prompts import render_prompt
    from sgsd_fast.rollout import HFRolloutEngine
    from sgsd_fast.skills.items import problem_hash

    sampler = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=1.0,
                              batch_size=batch_size)
    extractor = HFRolloutEngine(model, tokenizer, max_new_tokens=extract_max_new_tokens, batch_size=batch_size)
    merger = HFRolloutEngine(model, tokenizer, max_new_tokens=merge_max_new_tokens, batch_size=batch_size)

    def generate_fn(prompts: list[str]) -> list[str]:
        batch_seed = (seed * 1_000_003 + int(problem_hash("\x1e".join(prompts)), 16)) % (2**31)
        return sampler.generate(prompts, seed=batch_seed).completion_texts

    def extractor_fn(prompts: list[str]) -> list[str]:
        return extractor.generate(prompts, greedy=True).completion_texts

    def merge_fn(prompts: list[str]) -> list[str]:
        return merger.generate(prompts, greedy=True).completion_texts

    def render_fn(messages: list[dict]) -> str:
        return render_prompt(tokenizer, messages)

    return {"generate_fn": generate_fn, "extractor_fn": extractor_fn, "merge_fn": merge_fn, "render_fn": render_fn}


def _cmd_build(args: argparse.Namespace) -> int:
    from sgsd_fast.models import load_model_and_tokenizer
    from sgsd_fast.skills import build_bank
    from sgsd_fast.verify import Verifier

    problems = load_build_problems(args.data, seed=args.seed, split=args.split, limit=args.limit,
                                   problem_field=args.problem_field, answer_field=args.answer_field,
                                   config=args.dataset_config)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    fns = model_callables(
        model, tokenizer, max_new_tokens=args.max_new_tokens, extract_max_new_tokens=args.extract_max_new_tokens,
        merge_max_new_tokens=args.merge_max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    try:
        with Verifier(answer_phrase=args.answer_phrase) as verifier:
            summary = build_bank(problems, verify_fn=lambda c, a: verifier.score(c, a).rewards, out_path=args.out,
                                 model_name=args.model, group_size=args.group_size, batch_size=args.batch_size,
                                 progress=not args.no_progress, **fns)
    except KeyboardInterrupt:
        print(f"{_PROG} build: interrupted; finished work is saved in {args.out}, "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


_COMMANDS = {"build": _cmd_build, "show": _cmd_show, "stats": _cmd_stats, "export": _cmd_export,
             "import": _cmd_import, "diff": _cmd_diff}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `sgsd-fast skills` command; returns the exit status (bad input: 2, with a message)."""
    args, debug = split_debug(argv)
    try:
        ns = _parser().parse_args(args)
    except SystemExit as exit_:  # --help, or argparse's own usage error
        return int(exit_.code or 0)
    return run_command(f"{_PROG} {ns.command}", lambda: _COMMANDS[ns.command](ns), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
