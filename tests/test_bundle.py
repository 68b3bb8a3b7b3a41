"""The Databricks Asset Bundle: valid against the official schema, and right where the schema cannot look.

Both variants are checked: the bundle as `databricks.yml` includes it (job cluster) and with the
serverless job file instead. Then the wheel the bundle deploys is built and its console script run
from a fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import regex
import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from jobs.config import load_config
from jobs.secret_rules import find_secrets
from tests.bundle import (ROOT, SCHEMA, SERVERLESS, bundle_files, jobs, load_bundle, references, resolved,
                          variable_values)

VARIANTS = {"job_cluster": None, "serverless": SERVERLESS}
# Token shapes in raw text (comments included): Databricks PATs, OpenAI-style keys, bearer headers.
TOKEN_TEXT = re.compile(r"dapi[0-9a-f]{16,}|sk-[A-Za-z0-9_-]{16,}|Bearer\s+[A-Za-z0-9._-]{8,}")
TARGETS = ("dev", "prod")


def _pattern(validator, pattern, instance, schema):
    # The schema's patterns use \p{L} / \p{N}, which Python's `re` cannot compile; `regex` can.
    if validator.is_type(instance, "string") and not regex.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    return validators.extend(Draft202012Validator, {"pattern": _pattern})(schema)


def _leaves(err: ValidationError) -> list[ValidationError]:
    """The errors under each `oneOf`, without the `${var...}` alternative every scalar also offers."""
    if not err.context:
        return [err]
    leaves = [leaf for sub in err.context for leaf in _leaves(sub)]
    real = [e for e in leaves
            if not (e.validator == "pattern" and str(e.validator_value).startswith(r"\$\{"))]
    return real or leaves


def schema_errors(doc: dict) -> list[str]:
    return sorted({f"{'.'.join(map(str, leaf.absolute_path)) or '(root)'}: {leaf.message}"
                   for err in _validator().iter_errors(doc) for leaf in _leaves(err)})


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_file_validates_against_the_official_schema(variant):
    files = bundle_files(include=VARIANTS[variant])
    assert len(files) >= 2, "databricks.yml should include the job's resource file"
    for path, doc in files.items():
        assert schema_errors(doc) == [], f"{path.relative_to(ROOT)} breaks the bundle schema"


def test_the_schema_check_catches_a_nested_typo():
    """Guard for the validator above: a misspelt key inside a task must be reported, by name."""
    doc = yaml.safe_load((ROOT / "resources" / "batch_inference.job.yml").read_text())
    doc["resources"]["jobs"]["batch_inference"]["tasks"][0]["max_retry"] = 2
    doc["resources"]["jobs"]["batch_inference"]["schedule"]["pause_status"] = "STOPPED"
    errors = schema_errors(doc)
    assert any("tasks.0" in e and "'max_retry'" in e for e in errors), errors
    assert any("schedule.pause_status" in e and "'STOPPED'" in e for e in errors), errors


def test_targets_follow_the_template_shape():
    b = load_bundle()
    dev, prod = b["targets"]["dev"], b["targets"]["prod"]
    assert (dev["mode"], dev.get("default"), prod["mode"]) == ("development", True, "production")
    # Not under /Workspace/Shared (every user could change what the service principal runs): the home
    # of whoever deploys, which is the service principal when CI deploys as it.
    root = prod["workspace"]["root_path"]
    assert not root.startswith("/Workspace/Shared") and root.startswith("/Workspace/Users/${workspace.current_user.userName}/")
    assert prod["run_as"] == {"service_principal_name": "${var.service_principal}"}
    assert {p["level"] for p in prod["permissions"]} <= {"CAN_VIEW", "CAN_RUN", "CAN_MANAGE"}
    artifact, = b["artifacts"].values()
    assert (artifact["type"], artifact["path"]) == ("whl", ".")
    # Each deploy installs the wheel it just built, not a 0.1.0 a cluster already has.
    assert artifact["dynamic_version"] is True


def _upstream(task: dict, by_key: dict[str, dict]) -> set[str]:
    """Every task `task` waits for, directly or through others."""
    seen: set[str] = set()
    todo = [d["task_key"] for d in task.get("depends_on", [])]
    while todo:
        key = todo.pop()
        if key not in seen:
            seen.add(key)
            todo += [d["task_key"] for d in by_key[key].get("depends_on", [])]
    return seen


def test_tasks_sharing_a_job_cluster_never_run_at_once():
    """Each task plans its partitions over every task slot of the cluster: two at once would each ask
    for all of them, and neither would reach its max_concurrency."""
    for name, job in jobs(load_bundle()).items():
        by_key = {t["task_key"]: t for t in job["tasks"]}
        on_cluster = [t for t in job["tasks"] if "job_cluster_key" in t]
        for i, a in enumerate(on_cluster):
            for b in on_cluster[i + 1:]:
                if a["job_cluster_key"] == b["job_cluster_key"]:
                    ordered = a["task_key"] in _upstream(b, by_key) or b["task_key"] in _upstream(a, by_key)
                    assert ordered, f"{name}: {a['task_key']} and {b['task_key']} may run at once"
        # A failed first task must not cost the second one its run.
        assert all(t.get("run_if") == "ALL_DONE" for t in on_cluster if t.get("depends_on"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_cluster_and_environment_key_used_is_defined(variant):
    for name, job in jobs(load_bundle(include=VARIANTS[variant])).items():
        clusters = [c["job_cluster_key"] for c in job.get("job_clusters", [])]
        environments = [e["environment_key"] for e in job.get("environments", [])]
        assert len(set(clusters)) == len(clusters) and len(set(environments)) == len(environments)
        task_keys = {t["task_key"] for t in job["tasks"]}
        for task in job["tasks"]:
            where = f"{name}.{task['task_key']}"
            assert ("job_cluster_key" in task) != ("environment_key" in task), f"{where}: one compute"
            if "job_cluster_key" in task:
                assert task["job_cluster_key"] in clusters, f"{where}: job_cluster_key not defined"
            if "environment_key" in task:
                assert task["environment_key"] in environments, f"{where}: environment_key not defined"
                assert "libraries" not in task, f"{where}: serverless installs the wheel via environments"
            else:
                assert {"whl": "../dist/*.whl"} in task["libraries"], f"{where}: the wheel is not installed"
            for dep in task.get("depends_on", []):
                assert dep["task_key"] in task_keys, f"{where}: depends on an unknown task"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variable_used_is_declared_and_has_a_value_in_each_target(variant):
    b = load_bundle(include=VARIANTS[variant])
    declared = set(b["variables"])
    used = references(b)
    assert used - declared == set(), "used but not declared"
    if variant == "job_cluster":  # serverless has no use for the cluster's variables
        assert declared - used == set(), "declared but never used"
    for target in TARGETS:
        assert set(b["targets"][target].get("variables", {})) <= declared, f"{target}: undeclared variable"
        missing = used - set(variable_values(b, target))
        assert missing == set(), f"target {target}: no value for {sorted(missing)}"
        leftover = references(resolved(b, target), prefix="")
        assert leftover == set(), f"target {target}: unresolved {sorted(leftover)}"


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_task_runs_a_console_script_of_this_wheel(variant):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    for job in jobs(load_bundle(include=VARIANTS[variant])).values():
        for task in job["tasks"]:
            wheel = task["python_wheel_task"]
            assert wheel["package_name"] == project
            assert wheel["entry_point"] in _scripts(), f"{task['task_key']}: no such [project.scripts] entry"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_conf_file_exists_and_parses_under_the_config_model(variant, target):
    confs = {}
    for job in jobs(resolved(load_bundle(include=VARIANTS[variant]), target)).values():
        for task in job["tasks"]:
            conf = Path(task["python_wheel_task"]["named_parameters"]["conf"])
            assert conf.is_file(), f"{task['task_key']}: --conf {conf} does not exist"
            confs[task["task_key"]] = load_config(conf)
    assert {k: (c.endpoint.type, c.endpoint.task) for k, c in confs.items()} == {
        "completions": ("serving", "llm/v1/chat"), "embeddings": ("serving", "llm/v1/embeddings")}


def _bundle_texts() -> dict[Path, str]:
    paths = {*bundle_files(), *bundle_files(include=SERVERLESS), *ROOT.glob("conf/databricks_*.yml")}
    return {p: p.read_text() for p in sorted(paths)}


def _secret_literals(node) -> list[str]:
    """Where the bundle holds a secret, by the config's own rule; `${...}` references count as
    references, since the CLI fills them in from variables."""
    return [f.path for f in find_secrets(node, is_reference=lambda value: value.startswith("${"))]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_literal_anywhere_in_the_bundle(variant, target):
    # Resolved, so that a `{{secrets/${var...}/...}}` would be checked as the reference it becomes.
    assert _secret_literals(resolved(load_bundle(include=VARIANTS[variant]), target)) == []
    for path, text in _bundle_texts().items():
        if path.parent.name == "conf":
            assert _secret_literals(yaml.safe_load(text)) == [], path
        # Comments too: a token pasted into a comment is still committed.
        assert not TOKEN_TEXT.search(text), path


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_tasks_call_as_the_job_s_own_identity_with_a_pat_only_as_an_option(variant):
    """Under run_as, a PAT from a secret scope would call as its owner (their permissions, their gateway
    limits, a token that never refreshes and cannot reach route-optimized endpoints): by default no token
    reaches the tasks, and databricks-sdk resolves the job's own identity. The PAT stays an option."""
    job = jobs(resolved(load_bundle(include=VARIANTS[variant]), "prod"))["batch_inference"]
    assert [c["new_cluster"].get("spark_env_vars") for c in job.get("job_clusters", [])
            if c["new_cluster"].get("spark_env_vars")] == []
    for task in job["tasks"]:
        named = task["python_wheel_task"]["named_parameters"]
        assert not [k for k in named if k.startswith(("endpoint.token", "endpoint.auth"))], task["task_key"]
        cfg = load_config(named["conf"])
        assert (cfg.endpoint.token_env, cfg.endpoint.token_secret, cfg.endpoint.auth) == (None, None, "auto")
        # The documented option: a PAT from a secret scope, by two named parameters.
        pat = load_config(named["conf"], ["endpoint.token_secret.scope=batch-inference",
                                          "endpoint.token_secret.key=endpoint-token"])
        assert pat.endpoint.token_secret.model_dump() == {"scope": "batch-inference", "key": "endpoint-token"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_slowed_by_a_rate_limit_warns_before_its_timeout(variant):
    job = jobs(resolved(load_bundle(include=VARIANTS[variant]), "prod"))["batch_inference"]
    [rule] = job["health"]["rules"]
    assert (rule["metric"], rule["op"]) == ("RUN_DURATION_SECONDS", "GREATER_THAN")
    assert rule["value"] < min(t["timeout_seconds"] for t in job["tasks"])
    assert job["email_notifications"]["on_duration_warning_threshold_exceeded"] == [
        job["email_notifications"]["on_failure"][0]]


def test_the_schedule_comment_says_what_development_mode_does():
    """Databricks: development mode pauses schedules, but an explicit UNPAUSED runs them in dev too."""
    b = load_bundle()
    text = (ROOT / "databricks.yml").read_text()
    assert "whatever this says" not in text and "explicit UNPAUSED" in text
    assert b["variables"]["schedule_pause_status"]["default"] == "PAUSED"
    assert b["targets"]["dev"].get("variables", {}).get("schedule_pause_status", "PAUSED") == "PAUSED"


def test_every_repository_path_the_bundle_and_its_tests_name_exists():
    """Paths named in comments go stale when files move (the entry point moved under jobs/cli/)."""
    texts = {**_bundle_texts(), Path(__file__): Path(__file__).read_text()}
    for path, text in texts.items():
        for named in set(re.findall(r"(?<![\w/.])((?:jobs|udfs|conf|resources|tests)/[\w/.-]+\.(?:py|yml))", text)):
            if "*" not in named:
                assert (ROOT / named).exists(), f"{path.relative_to(ROOT)} names {named}, which does not exist"


def test_the_secret_check_sees_a_literal():
    """Guard for the check above."""
    job = {"spark_env_vars": {"BI_ENDPOINT_TOKEN": "abc123", "OK_TOKEN": "{{secrets/s/k}}"},
           "named_parameters": {"endpoint.api_key": "xyz", "endpoint.token_secret.scope": "llm"},
           "note": "dapi0123456789abcdef0123"}
    assert _secret_literals(job) == [
        "spark_env_vars.BI_ENDPOINT_TOKEN", "named_parameters.endpoint.api_key", "note"]
    assert TOKEN_TEXT.search("# pasted: dapi0123456789abcdef0123")


def test_gitignore_covers_build_outputs():
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert {"build/", "dist/", "*.egg-info/", ".databricks/"} <= ignored


# -- the wheel ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel with the bundle's own artifact command, from a copy of the sources.

    A copy, because setuptools writes build/ and *.egg-info/ next to the sources and other
    checkouts' processes share this tree. The build is isolated as the bundle's is, so its setuptools
    comes from the package index (or pip's configured find-links); it takes a few seconds.
    """
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for pkg in ("jobs", "udfs"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    artifact, = load_bundle()["artifacts"].values()
    command = artifact["build"].split()
    assert command[:3] == ["python", "-m", "build"], "the test runs the bundle's build command"
    done = subprocess.run([sys.executable, *command[1:], "--outdir", str(src / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built, = (src / "dist").glob("*.whl")
    return built


def test_the_wheel_leaves_spark_to_the_databricks_runtime(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        packages = {n.split("/", 1)[0] for n in zf.namelist() if n.endswith(".py")}
    unconditional = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
                     for r in requires if "extra ==" not in r}
    assert unconditional & {"pyspark", "delta-spark", "mlflow"} == set(), requires
    assert {"pydantic", "pyyaml", "databricks-sdk", "jsonschema"} <= unconditional
    assert packages == {"jobs", "udfs"}


def test_the_console_script_runs_help_from_a_fresh_venv(wheel, tmp_path):
    """The bundle's entry point, installed from the wheel alone into an empty venv.

    `--no-deps` and no site packages: the help path imports only the standard library (jobs/cli/run.py
    imports its config, pydantic and Spark after parsing), so this proves the wheel's console script
    is wired and importable without installing pyspark or anything else, in about a second. The
    venv's pip would be the slow part, so the running pip installs into it with `--python`.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Without the session fixture's PYTHONPATH (the checkout): through it pip would find this package's
    # own metadata, say "already satisfied" and install nothing.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for script in {t["python_wheel_task"]["entry_point"]
                   for j in jobs(load_bundle()).values() for t in j["tasks"]}:
        out = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        assert "--conf" in out.stdout and "--limit" in out.stdout and "--dry-run" in out.stdout
    no_spark = subprocess.run([str(py), "-c", "import pyspark"], capture_output=True, timeout=60, env=env)
    assert no_spark.returncode != 0, "the fresh venv should not see pyspark"


def test_the_serverless_job_calls_from_the_driver_on_a_current_environment():
    """Serverless runs Spark Connect and its UDFs cannot reach the internet: the driver calls."""
    [job] = jobs(load_bundle(include=SERVERLESS)).values()
    assert job["performance_target"] in ("STANDARD", "PERFORMANCE_OPTIMIZED")
    assert [int(e["spec"]["environment_version"]) for e in job["environments"]] == [5]
    for task in job["tasks"]:
        assert task["python_wheel_task"]["named_parameters"]["run.calls_from"] == "driver", task["task_key"]
