"""The job's own errors, and how any error is shown in one line.

`ConfigError` (a bad config, `jobs.config`) and these are what the entry point reports without a
stack trace; each names the table, column or key at fault.

Example::

    raise InputError("input.prompt_col: column 'prompt' not found in input.table main.raw.prompts")
"""

from __future__ import annotations


class InputError(ValueError):
    """The input table is missing, lacks a column, or breaks a rule (duplicate ids)."""


class JobFailed(RuntimeError):
    """The run finished, every row written, but must exit non-zero (`jobs.observe.verdict`): a row failed under
    `run.fail_on_error`, or more than `run.max_error_share` of the rows sent failed. A dry run whose
    checks fail raises its subclass `jobs.dryrun.checks.DryRunFailed`."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An error's first line, cut: Spark and Py4J messages run to pages of stack trace."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def brief(exc: BaseException) -> str:
    """`TypeName: first line` (or the type alone), for warnings about steps that may fail quietly."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
