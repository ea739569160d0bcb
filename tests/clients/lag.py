"""Replication lag: appends through icerelay, then polls the replica until each snapshot is there.

usage: lag.py RELAY_CONN_JSON REPLICA_CONN_JSON TABLE APPENDS
The table (ns.name) is created through icerelay. For each append, the lag is the time from the
moment the commit was answered (PyIceberg's append returned) to the moment the replica catalog's
loadTable lists the new snapshot (its files were copied before it was committed there).
Prints {"lags_ms": [...]}.
"""
import json
import sys
import time

import pyarrow as pa
import requests
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from common import emit, ensure_namespace, pyiceberg_catalog

relay_conn, replica_conn, name, appends = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ns, table_name = name.rsplit(".", 1)
cat = pyiceberg_catalog(relay_conn)
ensure_namespace(cat, ns)
schema = Schema(NestedField(1, "id", LongType(), required=False), NestedField(2, "name", StringType(), required=False))
table = cat.create_table(name, schema=schema)

client_id, secret = replica_conn["credential"].split(":", 1)
uri = replica_conn["uri"]
token = requests.post(f"{uri}/v1/oauth/tokens", data={"grant_type": "client_credentials", "client_id": client_id,
                                                       "client_secret": secret}).json()["access_token"]
session = requests.Session()
session.headers["Authorization"] = f"Bearer {token}"
prefix = session.get(f"{uri}/v1/config", params={"warehouse": replica_conn["warehouse"]}).json()["overrides"]["prefix"]
url = f"{uri}/v1/{prefix}/namespaces/{ns}/tables/{table_name}"


def replica_snapshots():
    answer = session.get(url)
    if answer.status_code != 200:
        return set()
    return {s["snapshot-id"] for s in answer.json()["metadata"].get("snapshots", [])}


lags = []
for k in range(appends):
    table.append(pa.table({"id": pa.array([k], pa.int64()), "name": pa.array([f"row-{k}"])}))
    answered = time.monotonic()
    sid = table.current_snapshot().snapshot_id
    deadline = answered + 60
    while sid not in replica_snapshots():
        if time.monotonic() > deadline:
            raise SystemExit(f"snapshot {sid} did not reach the replica within 60 s")
        time.sleep(0.005)
    lags.append((time.monotonic() - answered) * 1000)
    time.sleep(0.1)
emit({"lags_ms": lags})
