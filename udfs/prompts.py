"""What counts as a prompt worth sending, and what it is reckoned to cost: one rule each, for Spark and
for the engine alike.

A prompt is *blank* when it is null, empty, or only whitespace, where whitespace is any Unicode
white-space character (`str.isspace()`: tabs, line and paragraph separators, no-break and
ideographic spaces, ...), not only the ASCII space that Spark's `trim` strips. A blank prompt is the
error `empty_prompt` and is never sent.

`BLANK_REGEX` is written in the syntax Python's `re` and Java's `java.util.regex` share (`\\t`,
`\\xhh`, `\\uhhhh`), so the job's Spark precheck (`rlike`) and the engine apply the very same set.

A prompt's tokens, before an answer reports them, are reckoned as its characters divided by
`CHARS_PER_TOKEN`: the engine's token bucket reserves them, the dry run estimates with them, and the
run's statistics count answers without `usage` with them.

Example::

    is_blank(" \\u3000\\t")            # True
    F.col("prompt").rlike(BLANK_REGEX)  # the same rule as a Spark column
"""

from __future__ import annotations

import re

# Exactly the characters for which `str.isspace()` is true (tests/test_prompts.py enumerates them).
WHITESPACE_CLASS = r"\t\n\x0B\f\r\x1C-\x1F \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000"
BLANK_REGEX = rf"^[{WHITESPACE_CLASS}]*$"
_BLANK = re.compile(BLANK_REGEX)
# OpenAI's rule of thumb for English text; a bound on nothing, only an estimate until `usage` comes.
CHARS_PER_TOKEN = 4


def is_blank(prompt: str | None) -> bool:
    """Null, empty or whitespace only: never sent, the row is `empty_prompt`."""
    return prompt is None or _BLANK.match(prompt) is not None
