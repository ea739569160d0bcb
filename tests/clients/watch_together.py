"""Watches tables that a writer changes only together, as a reader of a replica would,
and reports every moment one of them was seen changed without the others.

usage: watch_together.py CONN_JSON TABLES_JSON STOP_FILE

Loads the tables' metadata over REST in a tight loop until STOP_FILE exists: the
first table, every other table, then the first again. When the first table did not
change in between, every table was seen at one moment of the first; each table must
then have as many snapshots as the first (the writer adds one to each per transaction,
and the tables start alike). A table that could not be loaded yet (not made) is skipped.
Prints {"checks": rounds with a stable first table, "states": distinct snapshot counts
seen, "violations": [{table: snapshot count}]}.
"""
import json
import os
import sys

from common import emit, pyiceberg_catalog

conn, tables, stop = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cat = pyiceberg_catalog(conn)


def snapshots(name):
    ns, table = name.rsplit(".", 1)
    response = cat._session.get(cat.url("namespaces/{namespace}/tables/{table}", namespace=ns, table=table))
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return len(response.json()["metadata"].get("snapshots") or [])


checks, states, violations = 0, set(), []
while not os.path.exists(stop):
    first = snapshots(tables[0])
    others = {name: snapshots(name) for name in tables[1:]}
    again = snapshots(tables[0])
    if first is None or again != first or any(n is None for n in others.values()):
        continue
    checks += 1
    states.add(first)
    if any(n != first for n in others.values()):
        violations.append({tables[0]: first, **others})

emit({"checks": checks, "states": sorted(states), "violations": violations[:20]})
