"""Checks a copied table with code independent of icerelay (fastavro, pyarrow).

usage: check_copy.py METADATA_URL FORBIDDEN_PREFIX [S3_JSON]

Walks the metadata.json, every manifest list, manifest, position-delete file and deletion-vector
footer the copy references, and reports:
  - every string (and bound) that starts with FORBIDDEN_PREFIX (the source's location);
  - every manifest_length that differs from the manifest's real size;
  - every live file_size_in_bytes that differs from the file's real size;
  - every referenced file that does not exist.
Prints {"violations": [...], "counts": {...}}.
"""
import io
import json
import pathlib
import struct
import sys

import fastavro
import pyarrow.parquet as pq

from common import emit

metadata_url, forbidden = sys.argv[1], sys.argv[2]
s3conf = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s3 = None
if s3conf:
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3conf["endpoint"], aws_access_key_id=s3conf["access_key_id"],
                      aws_secret_access_key=s3conf["secret_access_key"], region_name="us-east-1")
violations = []
counts = {"manifest_lists": 0, "manifests": 0, "entries": 0, "delete_files": 0, "puffins": 0, "strings": 0}


def local(path):
    rest = path[len("file:"):]
    return pathlib.Path(rest[2:] if rest.startswith("//") else rest)


def read(path):
    if path.startswith("file:"):
        return local(path).read_bytes()
    bucket, key = path.split("://", 1)[1].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def size(path):
    try:
        if path.startswith("file:"):
            return local(path).stat().st_size
        bucket, key = path.split("://", 1)[1].split("/", 1)
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception:
        return None


def scan(value, where):
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        counts["strings"] += 1
        if value.startswith(forbidden) or forbidden in value:
            violations.append(f"{where}: source path {value}")
    elif isinstance(value, dict):
        for k, v in value.items():
            scan(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            scan(v, f"{where}[{i}]")


metadata = json.loads(read(metadata_url))
scan(metadata, metadata_url)
manifests = {}
for snap in metadata.get("snapshots", []):
    ml = snap["manifest-list"]
    if size(ml) is None:
        violations.append(f"missing manifest list {ml}")
        continue
    counts["manifest_lists"] += 1
    reader = fastavro.reader(io.BytesIO(read(ml)))
    for key, value in reader.metadata.items():
        scan(value, f"{ml} header {key}")
    for m in reader:
        scan(m, ml)
        real = size(m["manifest_path"])
        if real is None:
            violations.append(f"missing manifest {m['manifest_path']}")
        elif real != m["manifest_length"]:
            violations.append(f"{ml}: manifest_length {m['manifest_length']} != real size {real} of {m['manifest_path']}")
        manifests[m["manifest_path"]] = True
for path in manifests:
    if size(path) is None:
        continue
    counts["manifests"] += 1
    reader = fastavro.reader(io.BytesIO(read(path)))
    for key, value in reader.metadata.items():
        scan(value, f"{path} header {key}")
    for entry in reader:
        counts["entries"] += 1
        scan(entry, path)
        if entry["status"] == 2:
            continue
        df = entry["data_file"]
        real = size(df["file_path"])
        if real is None:
            violations.append(f"{path}: missing file {df['file_path']}")
            continue
        if real != df["file_size_in_bytes"]:
            violations.append(f"{path}: file_size_in_bytes {df['file_size_in_bytes']} != real size {real} of {df['file_path']}")
        if df.get("content", 0) != 1:
            continue
        data = read(df["file_path"])
        if df["file_format"].upper() == "PUFFIN":
            counts["puffins"] += 1
            payload_len = struct.unpack("<I", data[-12:-8])[0]
            footer = json.loads(data[-12 - payload_len:-12])
            scan(footer, f"{df['file_path']} footer")
        else:
            counts["delete_files"] += 1
            table = pq.read_table(io.BytesIO(data), use_threads=False)
            scan(table.column("file_path").to_pylist(), f"{df['file_path']} file_path")
emit({"violations": violations, "counts": counts})
