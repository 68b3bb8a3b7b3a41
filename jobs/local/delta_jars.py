"""Fetch the Delta Lake jars for local Spark from Maven Central, once, into a project cache.

delta-spark's Python package carries no jars. Its own helper (`configure_spark_with_delta_pip`) sets
`spark.jars.packages`, which makes every session start run an Ivy resolution. We resolve once with
Maven instead, keep only the jars Spark does not already ship, and hand Spark plain file paths: later
sessions start with no network and no resolver. Where the jars go, and how a session finds them, is
`jobs.session`'s (`jars_dir`, `cached_jars`); this local tool only fills that folder.

Example::

    python -m jobs.local.delta_jars      # fetch if missing, print the folder (make install does it)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.session import JARS_MARKER, cached_jars, delta_coordinates, jars_dir

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.batch-inference</groupId><artifactId>delta-jars</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.delta</groupId><artifactId>{artifact}</artifactId><version>{version}</version></dependency>
  </dependencies>
</project>
"""


def _artifact_name(jar: str) -> str:
    """`jackson-core-2.13.5.jar` -> `jackson-core`: the name without its version."""
    return re.sub(r"-\d[^-]*(-\d+)?\.jar$", "", jar)


def _spark_shipped() -> set[str]:
    import pyspark

    return {_artifact_name(p.name) for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}


def fetch(folder: Path) -> list[Path]:
    """Resolve the Delta jar and its dependencies with Maven; keep those Spark does not ship."""
    if jars := cached_jars(folder):
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (`mvn`) is needed once to fetch the Delta Lake jars; install it and retry")
    artifact, version = delta_coordinates()
    with tempfile.TemporaryDirectory() as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_POM.format(artifact=artifact, version=version))
        out = Path(tmp) / "jars"
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={out}", "-DincludeScope=runtime"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mvn could not fetch io.delta:{artifact}:{version}:\n{proc.stdout[-2000:]}")
        shipped = _spark_shipped()
        folder.mkdir(parents=True, exist_ok=True)
        for jar in sorted(out.glob("*.jar")):
            if _artifact_name(jar.name) not in shipped:
                shutil.copy2(jar, folder / jar.name)
    (folder / JARS_MARKER).write_text(f"io.delta:{artifact}:{version}\n")
    return cached_jars(folder)


def main() -> None:
    folder = jars_dir()
    jars = fetch(folder)
    print(f"Delta Lake jars ({len(jars)}) in {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
