"""Reads a table as of given times (time travel by timestamp), with PyIceberg and DuckDB.

usage: read_as_of.py CONN_JSON TABLE TIMES_JSON EXTENSION_DIR
TIMES_JSON: a list of times in milliseconds since the epoch (UTC).
Prints {"pyiceberg": {ms: rows or null}, "duckdb": {ms: rows or null}, "errors": {...}}: rows as of
each time, sorted; null where the table had no snapshot yet.
"""
import datetime
import json
import sys

from common import duckdb_attach, duckdb_connect, emit, pyiceberg_catalog

conn, name, times, ext_dir = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
out = {"pyiceberg": {}, "duckdb": {}, "errors": {}}


def normalise(rows):
    return sorted(json.loads(json.dumps(rows, default=str)), key=lambda r: json.dumps(r, sort_keys=True))


table = pyiceberg_catalog(conn).load_table(name)
try:
    for ms in times:
        snapshot = table.snapshot_as_of_timestamp(ms)
        out["pyiceberg"][str(ms)] = (
            None if snapshot is None else normalise(table.scan(snapshot_id=snapshot.snapshot_id).to_arrow().to_pylist())
        )
except Exception as e:  # noqa: BLE001 - a reader's limits are reported, not hidden
    out["errors"]["pyiceberg"] = f"{type(e).__name__}: {e}"

try:
    con = duckdb_connect(ext_dir)
    con.execute("SET TimeZone = 'UTC'")
    duckdb_attach(con, conn, "cat")
    for ms in times:
        at = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        try:
            cur = con.execute(f"SELECT * FROM cat.{name} AT (TIMESTAMP => TIMESTAMP '{at}')")
            cols = [d[0] for d in cur.description]
            out["duckdb"][str(ms)] = normalise([dict(zip(cols, r)) for r in cur.fetchall()])
        except Exception as e:  # noqa: BLE001 - no snapshot at that time is an answer too
            if "snapshot" in str(e).lower() and ("no" in str(e).lower() or "not" in str(e).lower()):
                out["duckdb"][str(ms)] = None
            else:
                raise
except Exception as e:  # noqa: BLE001
    out["errors"]["duckdb"] = f"{type(e).__name__}: {e}"
emit(out)
