"""Runs a list of writes against a table with PyIceberg (or DuckDB), as a user would.

usage: writer.py CONN_JSON TABLE OPS_JSON [EXTENSION_DIR]

TABLE is "ns.name". OPS_JSON is a list of operations, run in order:
  {"op": "create", "partitioned": true, "format_version": 2}   namespace too, if missing
  {"op": "append", "start": 0, "rows": 5, "branch": "main"}
  {"op": "append_random", "mb": 48}                             one large data file of random text
                                                                (the output then has no "rows")
  {"op": "add_column", "name": "note"}                          later appends fill it
  {"op": "partition_by", "field": "category"}                   identity partition evolution
  {"op": "overwrite", "category": "a", "start": 100, "rows": 3, "branch": "main"}
  {"op": "delete_below", "id": 4}                               copy-on-write delete
  {"op": "tx_delete_append", "id": 4, "start": 0, "rows": 2}    one transaction: a delete, then an append
  {"op": "dynamic_overwrite", "start": 0, "rows": 3}            replaces the partitions the rows fall in
  {"op": "duckdb_delete", "ids": [1, 2]}                        merge-on-read (position deletes)
  {"op": "tag", "name": "v1"} / {"op": "branch", "name": "audit"}   at the current snapshot
  {"op": "expire", "keep_last": 1}                              remove older snapshots from metadata
  {"op": "rollback"}                                            main back to its current snapshot's parent
  {"op": "set_property", "key": "k", "value": "v"}
  {"op": "rename", "to": "ns.other"} / {"op": "drop"}
Prints {"metadata_location", "snapshots": [{"id", "parent", "seq", "ts"}], "refs": {name: id},
        "rows": {snapshot id: rows}} for the table as it is at the end (nothing after a drop).
"""
import datetime
import json
import sys

import pyarrow as pa
from pyiceberg.expressions import EqualTo, LessThan
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform
from pyiceberg.types import DoubleType, LongType, NestedField, StringType, TimestampType

from common import duckdb_attach, duckdb_connect, emit, ensure_namespace, pyiceberg_catalog

conn, name, ops = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
ext_dir = sys.argv[4] if len(sys.argv) > 4 else None
ns = name.rsplit(".", 1)[0]
cat = pyiceberg_catalog(conn)
columns = ["id", "ts", "category", "value"]


def batch(start, n):
    base = datetime.datetime(2024, 1, 1)
    cols = {
        "id": pa.array(range(start, start + n), pa.int64()),
        "ts": pa.array([base + datetime.timedelta(hours=9 * i) for i in range(start, start + n)], pa.timestamp("us")),
        "category": pa.array(["abc"[i % 3] for i in range(start, start + n)]),
        "value": pa.array([i * 0.25 for i in range(start, start + n)], pa.float64()),
    }
    for extra in columns[4:]:
        cols[extra] = pa.array([f"{extra}-{i}" for i in range(start, start + n)])
    return pa.table(cols)


def rows(table, sid):
    data = table.scan(snapshot_id=sid).to_arrow().to_pylist()
    return sorted(json.loads(json.dumps(data, default=str)), key=lambda r: json.dumps(r, sort_keys=True))


def random_batch(mb):
    import base64
    import os
    n = mb * 1024
    text = [base64.b64encode(os.urandom(768)).decode() for _ in range(n)]
    cols = {
        "id": pa.array(range(n), pa.int64()),
        "ts": pa.array([datetime.datetime(2024, 1, 1)] * n, pa.timestamp("us")),
        "category": pa.array(text),
        "value": pa.array([0.5] * n, pa.float64()),
    }
    for extra in columns[4:]:
        cols[extra] = pa.array([None] * n, pa.string())
    return pa.table(cols)


table = None
with_rows = True
for op in ops:
    kind = op["op"]
    if kind == "create":
        ensure_namespace(cat, ns)
        schema = Schema(
            NestedField(1, "id", LongType(), required=False),
            NestedField(2, "ts", TimestampType(), required=False),
            NestedField(3, "category", StringType(), required=False),
            NestedField(4, "value", DoubleType(), required=False),
        )
        spec = PartitionSpec(PartitionField(source_id=2, field_id=1000, transform=DayTransform(), name="ts_day")) \
            if op.get("partitioned", True) else PartitionSpec()
        props = {"format-version": str(op.get("format_version", 2))}
        table = cat.create_table(name, schema=schema, partition_spec=spec, properties=props)
    else:
        table = cat.load_table(name)
    if kind == "append":
        table.append(batch(op.get("start", 0), op.get("rows", 5)), branch=op.get("branch", "main"))
    elif kind == "append_random":
        table.append(random_batch(op["mb"]))
        with_rows = False
    elif kind == "add_column":
        with table.update_schema() as update:
            update.add_column(op["name"], StringType())
        columns.append(op["name"])
    elif kind == "partition_by":
        with table.update_spec() as update:
            update.add_identity(op["field"])
    elif kind == "overwrite":
        table.overwrite(batch(op.get("start", 100), op.get("rows", 3)), overwrite_filter=EqualTo("category", op["category"]),
                        branch=op.get("branch", "main"))
    elif kind == "delete_below":
        table.delete(delete_filter=LessThan("id", op["id"]))
    elif kind == "tx_delete_append":
        with table.transaction() as tx:
            tx.delete(delete_filter=LessThan("id", op["id"]))
            tx.append(batch(op.get("start", 0), op.get("rows", 2)))
    elif kind == "dynamic_overwrite":
        table.dynamic_partition_overwrite(batch(op.get("start", 0), op.get("rows", 3)))
    elif kind == "duckdb_delete":
        con = duckdb_connect(ext_dir)
        duckdb_attach(con, conn, "cat")
        con.execute(f"DELETE FROM cat.{name} WHERE id IN ({', '.join(str(i) for i in op['ids'])})")
        con.close()
    elif kind == "tag":
        table.manage_snapshots().create_tag(table.current_snapshot().snapshot_id, op["name"]).commit()
    elif kind == "branch":
        table.manage_snapshots().create_branch(table.current_snapshot().snapshot_id, op["name"]).commit()
    elif kind == "expire":
        # Newest by sequence number: some catalogs (rustberg) list snapshots out of order.
        newest = sorted(table.snapshots(), key=lambda s: (s.sequence_number, s.timestamp_ms))
        keep = {s.snapshot_id for s in newest[-op.get("keep_last", 1):]}
        keep |= {r.snapshot_id for r in table.metadata.refs.values()}
        old = [s.snapshot_id for s in table.snapshots() if s.snapshot_id not in keep]
        if old:
            table.maintenance.expire_snapshots().by_ids(old).commit()
    elif kind == "rollback":
        table.manage_snapshots().rollback_to_snapshot(table.current_snapshot().parent_snapshot_id).commit()
    elif kind == "set_property":
        with table.transaction() as tx:
            tx.set_properties({op["key"]: op["value"]})
    elif kind == "rename":
        cat.rename_table(name, op["to"])
        name = op["to"]
    elif kind == "drop":
        cat.drop_table(name)
        table = None
        name = None

if name is None:
    emit({"dropped": True})
else:
    table = cat.load_table(name)
    emit({
        "metadata_location": table.metadata_location,
        "snapshots": [{"id": s.snapshot_id, "parent": s.parent_snapshot_id, "seq": s.sequence_number,
                       "ts": s.timestamp_ms} for s in table.snapshots()],
        "refs": {k: r.snapshot_id for k, r in table.metadata.refs.items()},
        "rows": {str(s.snapshot_id): rows(table, s.snapshot_id) for s in table.snapshots()} if with_rows else None,
    })
