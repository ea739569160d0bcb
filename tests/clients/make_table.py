"""Creates NAMESPACE.TABLE with a few appends and leaves it, for benchmarks and demos.

usage: make_table.py CONN_JSON NAMESPACE TABLE [APPENDS] [ROWS_PER_APPEND] [PROPERTIES_JSON]
Prints {"metadata_location": ..., "snapshots": N}.
"""
import json
import sys

import pyarrow as pa
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from common import emit, ensure_namespace, pyiceberg_catalog

conn = json.loads(sys.argv[1])
ns, name = sys.argv[2], sys.argv[3]
appends = int(sys.argv[4]) if len(sys.argv) > 4 else 3
rows = int(sys.argv[5]) if len(sys.argv) > 5 else 10
properties = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
cat = pyiceberg_catalog(conn)
ensure_namespace(cat, ns)
schema = Schema(NestedField(1, "id", LongType(), required=False), NestedField(2, "name", StringType(), required=False))
table = cat.create_table_if_not_exists(f"{ns}.{name}", schema=schema, properties=properties)
for k in range(appends):
    ids = range(k * rows, (k + 1) * rows)
    # Random-looking names keep the Parquet files from compressing to nothing.
    table.append(pa.table({"id": pa.array(ids, pa.int64()),
                           "name": pa.array([f"row-{i}-{(i * 2654435761) % 4294967296:x}" for i in ids])}))
table = cat.load_table(f"{ns}.{name}")
emit({"metadata_location": table.metadata_location, "snapshots": len(table.snapshots())})
