"""Spark 3.5 with Iceberg 1.10's REST catalog, as a user runs it: SQL statements against a
table, then the table's snapshots and its rows at every snapshot.

usage: spark_sql.py CONN_JSON CLASSPATH TABLE STATEMENTS_JSON

CONN_JSON: {"uri", "warehouse"} of the REST catalog (icerelay, or a replica catalog directly);
CLASSPATH: the Iceberg runtime jars (scripts/setup-test-env.sh builds them; os.pathsep-joined).
TABLE is "ns.name"; in each statement `{t}` stands for the table as Spark names it
(`cat.ns.name`), `{name}` for "ns.name" (as procedures take it) and `{cat}` for the catalog.
STATEMENTS_JSON may be empty (only read).
Prints {"snapshots": [{"id", "parent", "operation"}] in commit order, "refs": {name: id},
        "rows": {snapshot id: sorted rows as JSON text}, "current": rows now}.
"""
import json
import sys

from common import emit, spark_session

conn, classpath, name, statements = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
spark = spark_session(classpath, **{
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.extensions": "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions",
    "spark.sql.catalog.cat": "org.apache.iceberg.spark.SparkCatalog",
    "spark.sql.catalog.cat.type": "rest",
    "spark.sql.catalog.cat.uri": conn["uri"],
    "spark.sql.catalog.cat.warehouse": conn["warehouse"],
    # Every read sees the catalog's current state, not a cached table.
    "spark.sql.catalog.cat.cache-enabled": "false",
})
table = f"cat.{name}"
for statement in statements:
    spark.sql(statement.format(t=table, name=name, cat="cat")).collect()


def rows(query):
    return sorted(json.dumps(r.asDict(recursive=True), sort_keys=True, default=str) for r in spark.sql(query).collect())


history = spark.sql(f"SELECT snapshot_id, parent_id, operation FROM {table}.snapshots ORDER BY committed_at").collect()
refs = {r.name: r.snapshot_id for r in spark.sql(f"SELECT name, snapshot_id FROM {table}.refs").collect()}
emit({
    "snapshots": [{"id": r.snapshot_id, "parent": r.parent_id, "operation": r.operation} for r in history],
    "refs": refs,
    "rows": {str(r.snapshot_id): rows(f"SELECT * FROM {table} VERSION AS OF {r.snapshot_id}") for r in history},
    "current": rows(f"SELECT * FROM {table}"),
})
