"""Reads a table at every snapshot, from its metadata.json or through a catalog.

usage: read_snapshots.py SOURCE_JSON EXTENSION_DIR [--counts]
SOURCE_JSON: {"metadata": URL, "s3": {...}?} to read a metadata.json directly, or
             {"catalog": CONN, "table": "ns.name"} to load the table through a REST catalog.
With --counts, reports row counts instead of rows (for big tables).
Prints {"snapshots": [ids in log order], "pyiceberg": {id: rows}, "duckdb": {id: rows},
        "errors": {...}} with rows sorted; a reader that cannot read the table reports its error
instead of rows, so the caller decides what must work.
"""
import json
import sys

from common import duckdb_attach, duckdb_connect, emit, pyiceberg_catalog

spec = json.loads(sys.argv[1])
ext_dir = sys.argv[2]
counts_only = "--counts" in sys.argv[3:]
out = {"pyiceberg": {}, "duckdb": {}, "errors": {}}


def normalise(rows):
    if counts_only:
        return len(rows)
    return sorted(json.loads(json.dumps(rows, default=str)), key=lambda r: json.dumps(r, sort_keys=True))


def s3_props(s3):
    if not s3:
        return {}
    return {"s3.endpoint": s3["endpoint"], "s3.access-key-id": s3["access_key_id"],
            "s3.secret-access-key": s3["secret_access_key"], "s3.region": s3.get("region", "us-east-1"),
            "s3.path-style-access": "true"}


if "metadata" in spec:
    from pyiceberg.table import StaticTable
    table = StaticTable.from_metadata(spec["metadata"], properties=s3_props(spec.get("s3")))
else:
    table = pyiceberg_catalog(spec["catalog"]).load_table(spec["table"])
snapshots = [s.snapshot_id for s in table.snapshots()]
out["snapshots"] = snapshots
out["metadata_location"] = table.metadata_location
try:
    for sid in snapshots:
        arrow = table.scan(snapshot_id=sid).to_arrow()
        out["pyiceberg"][str(sid)] = arrow.num_rows if counts_only else normalise(arrow.to_pylist())
except Exception as e:  # a reader's limits (e.g. v3) are reported, not hidden
    out["errors"]["pyiceberg"] = f"{type(e).__name__}: {e}"

try:
    con = duckdb_connect(ext_dir)
    if "metadata" in spec:
        s3 = spec.get("s3")
        if s3:
            endpoint = s3["endpoint"].split("://", 1)[1]
            con.execute(f"""CREATE SECRET s3 (TYPE S3, KEY_ID '{s3["access_key_id"]}', SECRET '{s3["secret_access_key"]}',
                REGION 'us-east-1', ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)""")
        source = f"iceberg_scan('{spec['metadata']}'"
        for sid in snapshots:
            if counts_only:
                out["duckdb"][str(sid)] = con.execute(f"SELECT count(*) FROM {source}, snapshot_from_id => {sid})").fetchone()[0]
                continue
            cur = con.execute(f"SELECT * FROM {source}, snapshot_from_id => {sid})")
            cols = [d[0] for d in cur.description]
            out["duckdb"][str(sid)] = normalise([dict(zip(cols, r)) for r in cur.fetchall()])
    else:
        duckdb_attach(con, spec["catalog"], "cat")
        for sid in snapshots:
            cur = con.execute(f"SELECT * FROM cat.{spec['table']} AT (VERSION => {sid})")
            cols = [d[0] for d in cur.description]
            out["duckdb"][str(sid)] = normalise([dict(zip(cols, r)) for r in cur.fetchall()])
except Exception as e:
    out["errors"]["duckdb"] = f"{type(e).__name__}: {e}"
emit(out)
