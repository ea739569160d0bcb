"""A user's session with PyIceberg, recorded so two runs can be compared.

usage: pyiceberg_scenario.py CONN_JSON NAMESPACE

Creates NAMESPACE and a partitioned table, appends three times, evolves the
schema, appends again, reads every snapshot by id (time travel), lists,
renames and drops. Prints what a user would see, minus what differs between
any two runs (ids, timestamps, uuids, locations, file sizes), with the
namespace written as <ns>.
"""
import datetime
import json
import sys

import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import DoubleType, LongType, NestedField, StringType, TimestampType

from common import emit, pyiceberg_catalog

conn = json.loads(sys.argv[1])
ns = sys.argv[2]
cat = pyiceberg_catalog(conn)
out = {}

cat.create_namespace(ns, {"owner": "e2e"})
out["namespace_properties"] = {k: v for k, v in cat.load_namespace_properties(ns).items() if k == "owner"}

schema = Schema(
    NestedField(1, "id", LongType(), required=False),
    NestedField(2, "ts", TimestampType(), required=False),
    NestedField(3, "category", StringType(), required=False),
    NestedField(4, "value", DoubleType(), required=False),
)
spec = PartitionSpec(
    PartitionField(source_id=3, field_id=1000, transform=IdentityTransform(), name="category"),
    PartitionField(source_id=2, field_id=1001, transform=DayTransform(), name="ts_day"),
)
table = cat.create_table(f"{ns}.events", schema=schema, partition_spec=spec)
out["created_schema"] = [(f.field_id, f.name, str(f.field_type)) for f in table.schema().fields]
out["created_spec"] = [(f.source_id, f.field_id, str(f.transform), f.name) for f in table.spec().fields]


def batch(start, n, with_note=False):
    base = datetime.datetime(2024, 1, 1)
    cols = {
        "id": pa.array(range(start, start + n), pa.int64()),
        "ts": pa.array([base + datetime.timedelta(hours=7 * i) for i in range(start, start + n)], pa.timestamp("us")),
        "category": pa.array(["abc"[i % 3] for i in range(start, start + n)], pa.string()),
        "value": pa.array([i * 1.5 for i in range(start, start + n)], pa.float64()),
    }
    if with_note:
        cols["note"] = pa.array([f"note-{i}" for i in range(start, start + n)], pa.string())
    return pa.table(cols)


for k in range(3):
    table.append(batch(k * 5, 5))
with table.update_schema() as update:
    update.add_column("note", StringType())
table = cat.load_table(f"{ns}.events")
table.append(batch(15, 4, with_note=True))
table = cat.load_table(f"{ns}.events")

out["schema_after_evolution"] = [(f.field_id, f.name, str(f.field_type)) for f in table.schema().fields]
out["schema_ids"] = sorted(s.schema_id for s in table.schemas().values())


def rows(arrow):
    return sorted(json.loads(json.dumps(arrow.to_pylist(), default=str)), key=lambda r: r["id"])


snapshots = table.snapshots()
out["snapshots"] = [
    {k: s.summary.additional_properties.get(k) for k in ("added-records", "total-records", "added-data-files", "total-data-files")}
    | {"operation": str(s.summary.operation), "has_parent": s.parent_snapshot_id is not None,
       "sequence_number": s.sequence_number}
    for s in snapshots
]
out["time_travel"] = [rows(table.scan(snapshot_id=s.snapshot_id).to_arrow()) for s in snapshots]
out["current_rows"] = rows(table.scan().to_arrow())
out["filtered_rows"] = rows(table.scan(row_filter="category == 'b' and id >= 4").to_arrow())
out["listed_tables"] = sorted(".".join(t[1:]) for t in cat.list_tables(ns))
out["namespace_listed"] = any(n == (ns,) for n in cat.list_namespaces())

cat.rename_table(f"{ns}.events", f"{ns}.events_renamed")
out["after_rename"] = {
    "old_exists": cat.table_exists(f"{ns}.events"),
    "new_rows": len(cat.load_table(f"{ns}.events_renamed").scan().to_arrow()),
    "listed": sorted(".".join(t[1:]) for t in cat.list_tables(ns)),
}
cat.drop_table(f"{ns}.events_renamed")
out["after_drop"] = {"exists": cat.table_exists(f"{ns}.events_renamed"), "listed": [list(t) for t in cat.list_tables(ns)]}
cat.drop_namespace(ns)
out["namespace_after_drop"] = any(n == (ns,) for n in cat.list_namespaces())
emit(out)
