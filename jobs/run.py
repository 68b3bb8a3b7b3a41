"""`batch-inference`: the console script a Databricks job (or a laptop) runs.

`main()` only parses arguments, loads and validates the config (before Spark starts), builds the
session and calls `jobs.pipeline.run_job`.

Example::

    batch-inference --conf conf/demo.yml --set limits.max_concurrency=16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.config import ConfigError, JobConfig, load_config

log = logging.getLogger("batch_inference")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch-inference",
                                description="Call a model endpoint for every row of a prompts table; "
                                            "land the outcomes in a Delta table.")
    p.add_argument("--conf", required=True, help="YAML config, e.g. conf/demo.yml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), e.g. --set limits.max_concurrency=16; repeatable")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("py4j", "urllib3", "databricks.sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load(argv: list[str] | None = None) -> JobConfig:
    args = build_parser().parse_args(argv)
    return load_config(args.conf, args.overrides)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = load(argv)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    log.info("effective config: %s", json.dumps(cfg.redacted(), sort_keys=True))

    from jobs.pipeline import InputError, JobFailed, run_job
    from jobs.session import get_spark

    try:
        summary = run_job(get_spark(), cfg)
    except (ConfigError, InputError) as exc:
        log.error("%s", exc)
        return 2
    except JobFailed as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps({"run_id": summary.run_id, "output_table": summary.output_table,
                      "pending_rows": summary.pending_rows, "by_status": summary.by_status,
                      "seconds": round(summary.seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
