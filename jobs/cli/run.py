"""`batch-inference`: the console script a Databricks job (or a laptop) runs.

`main()` only parses arguments, loads and validates the config (before Spark starts), builds the
session, logs one line of what the run will do (the full effective config with `--verbose`) and calls
`jobs.pipeline.run_job`. It takes both forms a `python_wheel_task`
passes:

- `parameters`, a list passed as is: `--conf conf/x.yml --set limits.max_concurrency=16 --limit 100`;
- `named_parameters`, a map passed as `--key=value`: `--conf=conf/x.yml --limits.max_concurrency=16`,
  followed by every job parameter, which Databricks pushes down to such tasks (`--limit=100`).

Config layers, later wins: the `--conf` file; config keys (`--set key=value`, then `--section.key=value`);
the job parameters `--limit` (-> `run.limit`) and `--dry-run` (-> `run.dry_run`), whose empty value
leaves the layers below alone.

The help path imports only the standard library, so `batch-inference --help` works wherever the
wheel is installed, Spark or not.

Example::

    batch-inference --conf conf/demo.yml --set limits.max_concurrency=16 --limit 10
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.config import JobConfig

log = logging.getLogger("batch_inference")

# The job parameters this entry point reads, as Databricks names them, and the config key each sets.
JOB_PARAMETERS = {"limit": "run.limit", "dry_run": "run.dry_run", "max_cost": "run.budget.max_cost",
                  "max_output_tokens": "run.budget.max_output_tokens"}
# What Databricks allows in a job parameter's name: only such a name can be a pushed-down parameter.
_JOB_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class ArgumentsError(ValueError):
    """Arguments the entry point cannot use: the message names each one and says what it accepts."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print usage and exit; main() reports it like every other bad input.
        raise ArgumentsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="batch-inference", allow_abbrev=False,  # `--lim=5` must not pass for `--limit`
                description="Call a model endpoint for every row of a prompts table; "
                            "land the outcomes in a Delta table.",
                epilog="Any config key can also be set as --section.key=VALUE (e.g. "
                       "--limits.max_concurrency=16), the form Databricks' named_parameters take. "
                       "Other --name=value job parameters Databricks pushes down are ignored with a "
                       "warning; near-misses of the options above are errors.")
    p.add_argument("--conf", required=True, help="YAML config, e.g. conf/demo.yml")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (dotted), e.g. --set limits.max_concurrency=16 run.limit=10; "
                        "takes several, and repeats")
    p.add_argument("--limit", metavar="ROWS",
                   help="job parameter: process at most ROWS pending rows (run.limit); empty: no change")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", nargs="?", const="true", metavar="BOOL",
                   help="job parameter: check config, input and endpoint (one probe request), count pending "
                        "rows, estimate tokens and cost; write nothing (run.dry_run)")
    p.add_argument("--max-cost", "--max_cost", dest="max_cost", metavar="AMOUNT",
                   help="job parameter: stop the run once it has cost AMOUNT at the endpoint's prices "
                        "(run.budget.max_cost, exit 3); empty: no change")
    p.add_argument("--max-output-tokens", "--max_output_tokens", dest="max_output_tokens", metavar="TOKENS",
                   help="job parameter: stop the run once it has been answered with TOKENS output tokens "
                        "(run.budget.max_output_tokens, exit 3); empty: no change")
    p.add_argument("--all", dest="dry_run_all", action="store_true",
                   help="with --dry-run: price every input row, as a full re-run would, not only the pending "
                        "ones (run.dry_run_all)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the full effective config (JSON) at the start, and debug logs")
    return p


@dataclass(frozen=True)
class Invocation:
    """What the arguments ask for: the config file, the overrides in the order they apply."""

    conf: str
    overrides: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    verbose: bool = False


def _budget_overrides(max_cost: str | None, max_output_tokens: str | None) -> list[str]:
    """The budget's job parameters; empty leaves the config's own."""
    out = []
    for name, value, kind in (("max_cost", max_cost, float), ("max_output_tokens", max_output_tokens, int)):
        if value is None or not value.strip():
            continue
        try:
            number = kind(value.strip())
        except ValueError:
            number = 0
        if number <= 0:
            raise ArgumentsError(f"--{name}={value}: expected a positive {'number' if kind is float else 'whole number'} "
                                 f"({JOB_PARAMETERS[name]}), or empty for the config's own")
        out.append(f"{JOB_PARAMETERS[name]}={number}")
    return out


def _job_parameter_overrides(limit: str | None, dry_run: str | None) -> list[str]:
    out = []
    if limit is not None and limit.strip():
        if not limit.strip().isdigit() or int(limit) < 1:
            raise ArgumentsError(f"--limit={limit}: expected a positive whole number of rows (run.limit), "
                                 "or empty for no limit")
        out.append(f"{JOB_PARAMETERS['limit']}={int(limit)}")
    if dry_run is not None and dry_run.strip():
        flag = dry_run.strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ArgumentsError(f"--dry_run={dry_run}: expected true or false (run.dry_run)")
        out.append(f"{JOB_PARAMETERS['dry_run']}={'true' if flag in _TRUE else 'false'}")
    return out


def _near_miss(name: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(name.replace("-", "_"), known, n=1, cutoff=0.75)
    return close[0] if close else None


def _classify(rest: list[str], sections: list[str]) -> tuple[list[str], list[str]]:
    """Split what argparse did not know into config keys and ignorable job parameters; else fail.

    Ignoring is safe only for the shape Databricks pushes down (`--name=value`, a legal job parameter
    name) when the name is not a near-miss of ours: `--limt=5` silently ignored would run every row.
    """
    options = ["conf", "set", "verbose", "all", *JOB_PARAMETERS]
    overrides, ignored, errors = [], [], []
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        section = name.split(".", 1)[0]
        if "." in name and section in sections:
            if not eq:  # the list form: `--limits.max_concurrency 16`
                if i >= len(rest) or rest[i].startswith("--"):
                    errors.append(f"{token}: expects a value (--{name}=VALUE)")
                    continue
                value, i = rest[i], i + 1
            overrides.append(f"{name}={value}")
            continue
        hint = _near_miss(section, sections) if "." in name else _near_miss(name, options + sections)
        if name and not eq and i < len(rest) and not rest[i].startswith("--"):
            i += 1  # the list form's value (`--limt 5`): it belongs to the option, not an error of its own
        if not name or not _JOB_PARAMETER_NAME.fullmatch(name) or (not eq and not hint):
            errors.append(f"{token}: not an option of batch-inference")
            continue
        if hint:
            shown = f"--{hint}.KEY=VALUE" if hint in sections else f"--{hint.replace('_', '-')}"
            errors.append(f"--{name}: unknown; did you mean {shown}?")
        else:
            ignored.append(name)
    if errors:
        raise ArgumentsError("unknown arguments: " + "; ".join(errors)
                             + " (options: --conf, --set, --limit, --dry-run, --all, --verbose, "
                             + f"--<{'|'.join(sections)}>.KEY=VALUE)")
    return overrides, ignored


def parse_args(argv: list[str] | None = None) -> Invocation:
    """The arguments as Databricks or a shell passes them -> an `Invocation` (or `ArgumentsError`)."""
    args, rest = build_parser().parse_known_args(argv)
    from jobs.config import JobConfig  # after parsing, so `--help` needs nothing but the stdlib

    sections = list(JobConfig.model_fields)
    keys, ignored = _classify(rest, sections)
    return Invocation(conf=args.conf,
                      overrides=[*args.overrides, *keys, *_job_parameter_overrides(args.limit, args.dry_run),
                                 *_budget_overrides(args.max_cost, args.max_output_tokens),
                                 *(["run.dry_run_all=true"] if args.dry_run_all else [])],
                      ignored=ignored, verbose=args.verbose)


def effective_config_text(cfg: JobConfig, inv: Invocation) -> str:
    """What this run will do, for the top of the job's output. Secrets are never in it: config
    refuses literal credentials, tokens come by reference (env var, secret scope), URLs are redacted."""
    head = f"effective config: --conf {inv.conf}"
    if inv.overrides:
        head += ", overridden: " + ", ".join(o.split("=", 1)[0] for o in inv.overrides)
    if inv.ignored:
        head += "; ignored job parameters: " + ", ".join(inv.ignored)
    return head + "\n" + json.dumps(cfg.redacted(), indent=2, sort_keys=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if verbose:
        logging.getLogger("batch_inference").setLevel(logging.DEBUG)
    # Their INFO is about themselves (py4j's callbacks, MLflow creating its database tables). MLflow sets
    # its loggers' level when imported, from MLFLOW_LOGGING_LEVEL: a level set here before would not last.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for noisy in ("py4j", "urllib3", "databricks.sdk", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# A run that spent its `run.budget` and stopped cleanly: neither done (0) nor failed (1).
EXIT_BUDGET = 3


def execute(argv: list[str] | None = None) -> int:
    """Run the job; the exit code: 0 done, 1 rows failed (more than `run.max_error_share` of those sent,
    or any under `run.fail_on_error`; the last line names the main reason), 2 bad input, 3 stopped
    because `run.budget` was spent (rows left pending; the next run resumes)."""
    setup_logging()
    try:
        inv = parse_args(argv)  # `--help` exits in here, having imported only the stdlib
    except ArgumentsError as exc:
        log.error("bad arguments: %s", exc)
        return 2
    if inv.verbose:
        setup_logging(verbose=True)
    from jobs.config import ConfigError, load_config

    try:
        cfg = load_config(inv.conf, inv.overrides)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    for name in inv.ignored:
        log.warning("ignoring job parameter --%s: batch-inference does not use it", name)
    if inv.verbose:
        print(effective_config_text(cfg, inv), flush=True)

    try:
        from jobs.errors import InputError, JobFailed
        from jobs.observe.lines import start_line
        from jobs.pipeline import calls_from, run_job
        from jobs.session import get_spark
    except ImportError as exc:  # the wheel leaves Spark to the Databricks runtime
        log.error("%s: off Databricks, install the local extra: pip install 'spark-batch-inference[local]'",
                  exc)
        return 2
    try:
        spark = get_spark()
        mode, _ = calls_from(spark, cfg.run.calls_from)
        log.info("%s", start_line(cfg, mode, f"run.calls_from: {cfg.run.calls_from}"))
        summary = run_job(spark, cfg)
    except (ConfigError, InputError) as exc:
        log.error("%s", exc)
        return 2
    except JobFailed as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:
        from jobs.endpoint.resolve import fatal_in

        reason = fatal_in(exc)  # a task met an untrusted certificate the driver's pre-flight did not
        if reason is None:
            raise
        log.error("endpoint: %s (chunks committed before it are kept; rerun to resume)", reason)
        return 2
    if summary is not None and summary.stopped == "budget":
        log.warning("stopped: budget: spent %s of %s; %d row(s) left pending: the next run sends them",
                    summary.spent, summary.budget, summary.pending_rows - sum(summary.by_status.values()))
        return EXIT_BUDGET
    return 0  # the run's last line, what it did and where the results are, is logged by jobs.observe


def main(argv: list[str] | None = None) -> int:
    """The console script. A failure raises `SystemExit`: Databricks' wheel runner calls this function
    and ignores what it returns, so only an exception marks the task failed."""
    code = execute(argv)
    if code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    main()
