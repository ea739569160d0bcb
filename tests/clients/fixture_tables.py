"""Builds source tables with history, written by real writers, for copy and replication tests.

usage: fixture_tables.py KIND CONN_JSON NAMESPACE TABLE [EXTENSION_DIR]

KIND:
  pyiceberg   v2, PyIceberg: 3 appends, overwrite, copy-on-write delete, schema evolution,
              partition evolution, more appends
  duckdb-mor  v2, DuckDB through the REST catalog: inserts, merge-on-read DELETE and UPDATE
              (position-delete files)
  duckdb-v3   v3, DuckDB: inserts and deletes as deletion vectors (Puffin); needs a catalog
              whose storage accepts .puffin (rustberg's file warehouse)
Prints {"metadata_location": ..., "snapshot_ids": [...]}.
"""
import datetime
import json
import sys

from common import duckdb_attach, duckdb_connect, emit, ensure_namespace, pyiceberg_catalog

kind, conn, ns, name = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
ext_dir = sys.argv[5] if len(sys.argv) > 5 else None


def pyiceberg_table():
    import pyarrow as pa
    from pyiceberg.expressions import EqualTo, LessThan
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import DayTransform
    from pyiceberg.types import DoubleType, LongType, NestedField, StringType, TimestampType

    cat = pyiceberg_catalog(conn)
    ensure_namespace(cat, ns)
    schema = Schema(
        NestedField(1, "id", LongType(), required=False),
        NestedField(2, "ts", TimestampType(), required=False),
        NestedField(3, "category", StringType(), required=False),
        NestedField(4, "value", DoubleType(), required=False),
    )
    spec = PartitionSpec(PartitionField(source_id=2, field_id=1000, transform=DayTransform(), name="ts_day"))
    table = cat.create_table(f"{ns}.{name}", schema=schema, partition_spec=spec)

    def batch(start, n, note=False):
        base = datetime.datetime(2024, 1, 1)
        cols = {
            "id": pa.array(range(start, start + n), pa.int64()),
            "ts": pa.array([base + datetime.timedelta(hours=9 * i) for i in range(start, start + n)], pa.timestamp("us")),
            "category": pa.array(["abc"[i % 3] for i in range(start, start + n)]),
            "value": pa.array([i * 0.25 for i in range(start, start + n)], pa.float64()),
        }
        if note:
            cols["note"] = pa.array([f"n{i}" for i in range(start, start + n)])
        return pa.table(cols)

    for k in range(3):
        table.append(batch(k * 6, 6))
    table.overwrite(batch(100, 3), overwrite_filter=EqualTo("category", "a"))
    table.delete(delete_filter=LessThan("id", 4))
    with table.update_schema() as update:
        update.add_column("note", StringType())
    table = cat.load_table(f"{ns}.{name}")
    table.append(batch(200, 5, note=True))
    with table.update_spec() as update:
        update.add_identity("category")
    table = cat.load_table(f"{ns}.{name}")
    table.append(batch(300, 4, note=True))
    table = cat.load_table(f"{ns}.{name}")
    return table.metadata_location, [s.snapshot_id for s in table.snapshots()]


def duckdb_table(v3):
    con = duckdb_connect(ext_dir)
    duckdb_attach(con, conn, "cat")
    con.execute(f"CREATE SCHEMA IF NOT EXISTS cat.{ns}")
    with_clause = " WITH ('format-version' = '3')" if v3 else ""
    con.execute(f"CREATE TABLE cat.{ns}.{name} (id BIGINT, name VARCHAR, score DOUBLE){with_clause}")
    con.execute(f"INSERT INTO cat.{ns}.{name} SELECT i, 'row-' || i, i * 1.5 FROM range(10) t(i)")
    con.execute(f"INSERT INTO cat.{ns}.{name} SELECT i, 'row-' || i, i * 1.5 FROM range(10, 16) t(i)")
    con.execute(f"DELETE FROM cat.{ns}.{name} WHERE id IN (1, 4, 11)")
    con.execute(f"UPDATE cat.{ns}.{name} SET score = -1 WHERE id = 7")
    con.execute(f"DELETE FROM cat.{ns}.{name} WHERE id = 13")
    con.execute(f"INSERT INTO cat.{ns}.{name} VALUES (99, 'late', 0.5)")
    snaps = con.execute(f"SELECT snapshot_id FROM iceberg_snapshots(cat.{ns}.{name}) ORDER BY sequence_number").fetchall()
    con.close()
    cat = pyiceberg_catalog(conn)
    table = cat.load_table(f"{ns}.{name}")
    return table.metadata_location, [s[0] for s in snaps]


if kind == "pyiceberg":
    location, ids = pyiceberg_table()
elif kind == "duckdb-mor":
    location, ids = duckdb_table(v3=False)
elif kind == "duckdb-v3":
    location, ids = duckdb_table(v3=True)
else:
    raise SystemExit(f"unknown kind {kind}")
emit({"metadata_location": location, "snapshot_ids": ids})
