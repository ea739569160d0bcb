"""Multi-table transactions as a client sends them: PyIceberg prepares each table's
append (writing its data files, manifests and manifest list), then one
POST .../transactions/commit commits all of them, atomically on the catalog.

usage: multi_table.py CONN_JSON OPS_JSON

OPS_JSON is a list of operations, run in order:
  {"op": "create", "tables": ["ns.a", "ns.b"]}                 unpartitioned; the namespace too
  {"op": "append", "tables": ["ns.a"], "start": 0, "rows": 2}  one ordinary commit per table
  {"op": "transactions", "tables": ["ns.a", "ns.b"], "count": 10, "rows": 2}
        `count` transactions, each appending `rows` rows to every table in one commit
Prints {"tables": {name: {"metadata_location", "snapshots": [ids in order],
        "rows": {snapshot id: row count}}}} as the tables are at the end.
"""
import json
import sys

import pyarrow as pa
from pyiceberg.catalog.rest import TableIdentifier
from pyiceberg.schema import Schema
from pyiceberg.table import CommitTableRequest
from pyiceberg.types import LongType, NestedField, StringType

from common import emit, ensure_namespace, pyiceberg_catalog

conn, ops = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cat = pyiceberg_catalog(conn)
written = {}


def batch(table, start, n):
    return pa.table({
        "id": pa.array(range(start, start + n), pa.int64()),
        "source": pa.array([table] * n),
    })


def identifier(name):
    ns, table = name.rsplit(".", 1)
    return TableIdentifier(namespace=tuple(ns.split(".")), name=table)


def commit_together(names, start, rows):
    """One append per table, sent as one transactions/commit."""
    changes = []
    for name in names:
        tx = cat.load_table(name).transaction()
        tx.append(batch(name, start, rows))
        request = CommitTableRequest(identifier=identifier(name), requirements=tx._requirements, updates=tx._updates)
        changes.append(json.loads(request.model_dump_json()))
    response = cat._session.post(
        cat.url("transactions/commit"),
        data=json.dumps({"table-changes": changes}).encode(),
        headers={"Content-Type": "application/json"},
    )
    if response.status_code != 204:
        raise SystemExit(f"transactions/commit answered {response.status_code}: {response.text}")


for op in ops:
    kind = op["op"]
    if kind == "create":
        schema = Schema(
            NestedField(1, "id", LongType(), required=False),
            NestedField(2, "source", StringType(), required=False),
        )
        for name in op["tables"]:
            ensure_namespace(cat, name.rsplit(".", 1)[0])
            cat.create_table(name, schema=schema)
    elif kind == "append":
        for name in op["tables"]:
            cat.load_table(name).append(batch(name, op.get("start", 0), op.get("rows", 2)))
    elif kind == "transactions":
        for k in range(op.get("count", 1)):
            commit_together(op["tables"], op.get("start", 0) + k * 100, op.get("rows", 2))
    written.update({name: True for name in op["tables"]})

result = {}
for name in written:
    table = cat.load_table(name)
    result[name] = {
        "metadata_location": table.metadata_location,
        "snapshots": [s.snapshot_id for s in table.snapshots()],
        "rows": {str(s.snapshot_id): table.scan(snapshot_id=s.snapshot_id).to_arrow().num_rows for s in table.snapshots()},
    }
emit({"tables": result})
