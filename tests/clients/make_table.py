"""Creates NAMESPACE.TABLE with a few appends and leaves it, for benchmarks and demos.

usage: make_table.py CONN_JSON NAMESPACE TABLE [APPENDS]
Prints {"metadata_location": ..., "snapshots": N}.
"""
import json
import sys

import pyarrow as pa
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from common import emit, pyiceberg_catalog

conn = json.loads(sys.argv[1])
ns, name = sys.argv[2], sys.argv[3]
appends = int(sys.argv[4]) if len(sys.argv) > 4 else 3
cat = pyiceberg_catalog(conn)
cat.create_namespace_if_not_exists(ns)
schema = Schema(NestedField(1, "id", LongType(), required=False), NestedField(2, "name", StringType(), required=False))
table = cat.create_table_if_not_exists(f"{ns}.{name}", schema=schema)
for k in range(appends):
    table.append(pa.table({"id": pa.array(range(k * 10, k * 10 + 10), pa.int64()),
                           "name": pa.array([f"row-{i}" for i in range(k * 10, k * 10 + 10)])}))
table = cat.load_table(f"{ns}.{name}")
emit({"metadata_location": table.metadata_location, "snapshots": len(table.snapshots())})
