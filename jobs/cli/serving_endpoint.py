"""`batch-inference-endpoint`: create or update a Databricks serving endpoint from a YAML spec.

`main()` parses the arguments, checks the spec (before any request) and calls
`jobs.endpoint.serving_endpoints.ensure_endpoint` through MLflow's deployment client. It prints one JSON line:
`{"endpoint", "action", "differences", "state", "seconds"}`; exit 2 for a bad spec, 1 when the
endpoint fails or times out.

Example::

    batch-inference-endpoint --spec conf/endpoint_openai_embeddings.yml --timeout-s 1200
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli.run import setup_logging
from jobs.endpoint.serving_endpoints import EndpointFailed, SpecError, ensure_endpoint, load_spec
from jobs.errors import first_line

log = logging.getLogger("batch_inference.serving")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch-inference-endpoint",
                                description="Create or update a serving endpoint from a YAML spec "
                                            "(idempotent).")
    p.add_argument("--spec", required=True, help="YAML spec, e.g. conf/endpoint_openai_embeddings.yml")
    p.add_argument("--target", default="databricks", help="MLflow deployment target (databricks[://profile])")
    p.add_argument("--timeout-s", type=float, default=1200.0,
                   help="how long to wait for READY (default 1200)")
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between state checks (default 10)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; send nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        log.error("bad spec: %s", exc)
        return 2
    try:
        from mlflow.deployments import get_deploy_client
    except ImportError:  # not a wheel requirement: Databricks runtimes bring MLflow, laptops may not
        log.error("batch-inference-endpoint needs MLflow's deployment client: pip install mlflow-skinny")
        return 2
    try:
        change = ensure_endpoint(get_deploy_client(args.target), spec, timeout_s=args.timeout_s,
                                 poll_s=args.poll_s, dry_run=args.dry_run)
    except EndpointFailed as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:  # HTTP and auth errors: mlflow's message names the URL and the server's reason
        log.error("endpoint %s: %s: %s", spec["name"], type(exc).__name__, first_line(exc, 500))
        return 1
    print(json.dumps({"endpoint": change.name, "action": change.action, "differences": change.differences,
                      "state": change.state, "seconds": change.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
