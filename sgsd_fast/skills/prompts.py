"""Every piece of wording the skill-bank builder sends to a model, in one place (the project's own text).

* extraction prompts: a verified attempt -> at most N general skills (success) or mistakes (failure);
* merge prompt: a group of notes -> a shorter list of distinct, general notes.

All prompts ask for plain JSON so `sgsd_fast.skills.parsing` can read the reply. The teacher prompt
built from a retrieved pair is a training prompt: `sgsd_fast.prompts.skill_conditioned_messages`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .items import FIELDS

_FIELD_GUIDE = {
    "skill": (
        '"title" (a few words naming the technique), '
        '"principle" (the idea itself, in one or two sentences) and '
        '"when_to_apply" (the kind of problem or the moment in a solution where it pays off)'
    ),
    "mistake": (
        '"description" (what goes wrong, stated generally), '
        '"why_it_happens" (the reason solvers slip into it) and '
        '"how_to_avoid" (the concrete habit that prevents it)'
    ),
}

EXTRACT_SKILLS = (
    "Below is a problem and a solution that reached the correct answer.\n\n"
    "Problem:\n{question}\n\nSolution:\n{completion}\n\n"
    "Name at most {max_items} general problem-solving techniques this solution relied on that would "
    "also help with other problems of the same type. Describe each one in general terms: no numbers, "
    "names or answers from this particular problem.\n"
    "Reply with a JSON list only. Each element is an object with the keys {field_guide}."
)

EXTRACT_MISTAKES = (
    "Below is a problem and a solution that did NOT reach the correct answer{answer_clause}.\n\n"
    "Problem:\n{question}\n\nSolution:\n{completion}\n\n"
    "Name at most {max_items} general mistakes this solution made that solvers commonly make on problems "
    "of the same type. Describe each one in general terms: no numbers, names or answers from this "
    "particular problem.\n"
    "Reply with a JSON list only. Each element is an object with the keys {field_guide}."
)

MERGE = (
    "Here is a JSON list of {noun} collected from many different solutions. Several of them say the "
    "same thing in different words.\n\n{items}\n\n"
    "Rewrite it as a shorter list: combine entries that share one insight into a single entry, keep "
    "every insight that is genuinely different, word each entry generally (no numbers, names or "
    "answers from specific problems), and put the most widely useful entries first.\n"
    "Reply with a JSON list only. Each element is an object with the keys {field_guide}."
)

_NOUNS = {"skill": "problem-solving techniques", "mistake": "common mistakes"}

#: Reply prefill: the opening of the expected JSON, appended to the rendered extraction/merge
#: prompt so the model continues a JSON list instead of deciding whether to write one (small
#: models otherwise answer in prose). The prefix is put back in front of the reply before parsing.
REPLY_PREFIX = {"skill": '[{"title": "', "mistake": '[{"description": "'}

#: Solutions are cut to this many characters in extraction prompts: the reasoning that matters
#: fits, and a runaway rollout cannot blow the extractor's context.
MAX_SOLUTION_CHARS = 4000


def _clip(text: str, limit: int = MAX_SOLUTION_CHARS) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def extraction_text(kind: str, question: str, completion: str, *, answer: str = "", max_items: int = 3) -> str:
    """Prompt asking for at most `max_items` skills (kind="skill") or mistakes (kind="mistake").

    For mistakes the correct `answer`, when known, is shown so the extractor can locate the error.
    """
    template = EXTRACT_SKILLS if kind == "skill" else EXTRACT_MISTAKES
    answer_clause = f" ({answer})" if answer else ""
    return template.format(question=question, completion=_clip(completion), answer_clause=answer_clause,
                           max_items=max_items, field_guide=_FIELD_GUIDE[kind])


def merge_text(kind: str, items: Sequence[Mapping[str, str]]) -> str:
    """Prompt asking to merge a group of notes of one kind into a shorter, deduplicated list."""
    listing = json.dumps([{name: item[name] for name in FIELDS[kind]} for item in items], indent=1, ensure_ascii=False)
    return MERGE.format(noun=_NOUNS[kind], items=listing, field_guide=_FIELD_GUIDE[kind])
