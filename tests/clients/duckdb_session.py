"""A DuckDB session against an Iceberg REST catalog, recorded for comparison.

usage: duckdb_session.py CONN_JSON EXTENSION_DIR NAMESPACE [--write]

With --write, creates NAMESPACE.ducks and inserts, updates and deletes rows
through the attached catalog first. Always reads NAMESPACE.ducks back: rows,
snapshot count, and a time-travel read of the first snapshot.
"""
import json
import sys

from common import duckdb_attach, duckdb_connect, emit

conn = json.loads(sys.argv[1])
ext_dir = sys.argv[2]
ns = sys.argv[3]
write = "--write" in sys.argv[4:]

con = duckdb_connect(ext_dir)
duckdb_attach(con, conn, "cat")
if write:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS cat.{ns}")
    con.execute(f"CREATE TABLE cat.{ns}.ducks (id BIGINT, name VARCHAR, score DOUBLE)")
    con.execute(f"INSERT INTO cat.{ns}.ducks SELECT i, 'duck-' || i, i * 0.5 FROM range(10) t(i)")
    con.execute(f"INSERT INTO cat.{ns}.ducks VALUES (10, 'late', 99.0)")
    con.execute(f"DELETE FROM cat.{ns}.ducks WHERE id IN (2, 3)")
    con.execute(f"UPDATE cat.{ns}.ducks SET score = -1 WHERE id = 5")

rows = con.execute(f"SELECT id, name, score FROM cat.{ns}.ducks ORDER BY id").fetchall()
snaps = con.execute(
    f"SELECT sequence_number, snapshot_id FROM iceberg_snapshots(cat.{ns}.ducks) ORDER BY sequence_number"
).fetchall()
first = con.execute(f"SELECT count(*) FROM cat.{ns}.ducks AT (VERSION => {snaps[0][1]})").fetchone()[0]
emit({"rows": rows, "snapshot_count": len(snaps), "first_snapshot_rows": first})
