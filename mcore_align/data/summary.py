"""The console summary of a tokenized dataset: records kept, dropped by reason, oddities.

Rank 0 logs it as one WARNING block (the default log level shows it), e.g.::

    data summary (train, paired): 300 records read, 296 kept, 4 dropped
      dropped  identical_chosen_rejected  3  chosen == rejected: no preference signal; first at data.jsonl:17
      dropped  too_long                   1  longer than max_length (truncation_strategy=delete)
      note     images_ignored             6  records carry images: this text-only pipeline ignores them

The same counts are in `data_report.json` (`dropped`, `warnings`, `first_dropped`).
"""
from __future__ import annotations

# Why a record was dropped. Malformed records (the first group) stop the run under
# on_bad_record="error"; the others are always dropped.
DROP_REASONS = {
    "missing_field": "a required field is missing",
    "mistyped_field": "a field has the wrong type or shape",
    "bad_label": "the KTO label is not a boolean",
    "non_utf8": "text is not valid UTF-8",
    "empty_prompt": "the prompt has no user turn",
    "empty_response": "a response is empty",
    "roles_out_of_order": "turns are not [system], user, assistant, ..., user",
    "empty_user_turn": "a user turn is empty",
    "identical_chosen_rejected": "chosen == rejected: no preference signal",
    "too_long": "longer than max_length (truncation_strategy=delete)",
    "too_long_after_truncation": "no prompt token left after truncation_left",
    "prompt_too_long": "the prompt alone reaches max_length (truncation_strategy=right)",
    "image_cut_by_truncation": "truncation would cut an image's tokens (vision model)",
    "images_on_text_model": "the record has images but the model is text-only",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image cannot be read",
    "image_count_mismatch": "<image> placeholders and images disagree",
}
# Records kept, but not quite as written.
NOTE_REASONS = {
    "images_ignored": "records carry images: this text-only pipeline ignores them",
    "truncated_left": "prompts cut on the left to max_length",
    "truncated_right": "responses cut on the right to max_length",
    "prompt_boundary_merged": "a token spans the prompt/response boundary (shared prompt shortened)",
}


def format_summary(meta: dict, title: str) -> str:
    """Lines for one tokenized store's `meta` (see store.build_store)."""
    dropped, notes = meta.get("dropped", {}), meta.get("warnings", {})
    first = meta.get("first_dropped", {})
    lines = [f"data summary ({title}, {meta.get('objective_kind', '?')}): {meta['records_read_total']} records "
             f"read, {meta['records_kept']} kept, {meta['dropped_total']} dropped"]
    width = max((len(k) for k in (*dropped, *notes)), default=0)
    for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
        where = _location(first.get(reason))
        lines.append(f"  dropped  {reason:<{width}}  {n}  {DROP_REASONS.get(reason, '')}"
                     + (f"; first at {where}" if where else ""))
    for reason, n in sorted(notes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  note     {reason:<{width}}  {n}  {NOTE_REASONS.get(reason, '')}")
    return "\n".join(lines)


def _location(message: str | None) -> str | None:
    """"data.jsonl:17: the chosen ..." -> "data.jsonl:17" (the text before ': ')."""
    if not message:
        return None
    return message.split(": ", 1)[0]
