"""Tries one append to a table with PyIceberg and reports how the catalog answered.

usage: try_write.py CONN_JSON TABLE
Prints {"ok": bool, "error_type": class name or null, "error": message or null}.
A refusal is an expected outcome here, so it is printed, not raised.
"""
import json
import sys

import pyarrow as pa

from common import emit, pyiceberg_catalog

conn, name = json.loads(sys.argv[1]), sys.argv[2]
table = pyiceberg_catalog(conn).load_table(name)
schema = table.schema().as_arrow()
batch = pa.Table.from_pylist([{f.name: None for f in schema} | {"id": 999_999}], schema=schema)
try:
    table.append(batch)
    emit({"ok": True, "error_type": None, "error": None})
except Exception as e:  # noqa: BLE001 - the point is to report whatever the catalog answered
    emit({"ok": False, "error_type": type(e).__name__, "error": str(e)})
