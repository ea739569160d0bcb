"""Shared helpers for the client scripts the Rust end-to-end tests run.

Every script prints one JSON document on stdout; the Rust side compares them.
Connection settings come from command-line JSON so the scripts never read the
test's environment or files.
"""
import json
import os
import sys


def emit(result):
    """Prints the result and ends the process.

    The interpreter's teardown is skipped (os._exit): pyarrow's and DuckDB's
    background threads have been seen to abort it ("terminate called without
    an active exception") after all the work was done, failing a test for
    nothing. So emit is the last thing a script does.
    """
    json.dump(result, sys.stdout, sort_keys=True, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pyiceberg_catalog(conn):
    """conn: {"uri", "warehouse", "credential"?, "sigv4"?: {"access_key_id", "secret_access_key",
    "service"?, "region"?}, "s3": {...}?, "ca_file"?} -> a pyiceberg RestCatalog.

    ca_file: the PEM CA that issued an https catalog's certificate (PyIceberg's ssl.cabundle)."""
    from pyiceberg.catalog import load_catalog

    props = {"type": "rest", "uri": conn["uri"], "warehouse": conn["warehouse"]}
    if conn.get("credential"):
        props["credential"] = conn["credential"]
    sigv4 = conn.get("sigv4")
    if sigv4:
        # As an engine on AWS signs: rest.sigv4-enabled with its own keys.
        props.update({
            "rest.sigv4-enabled": "true",
            "rest.signing-name": sigv4.get("service", "s3tables"),
            "rest.signing-region": sigv4.get("region", "us-east-1"),
            "client.access-key-id": sigv4["access_key_id"],
            "client.secret-access-key": sigv4["secret_access_key"],
            "client.region": sigv4.get("region", "us-east-1"),
        })
    if conn.get("ca_file"):
        props["ssl"] = {"cabundle": conn["ca_file"]}
        # PyIceberg's OAuth2 token request uses a session of its own that
        # ignores ssl.cabundle; requests' environment variable reaches it.
        os.environ["REQUESTS_CA_BUNDLE"] = conn["ca_file"]
    s3 = conn.get("s3")
    if s3:
        props.update({
            "s3.endpoint": s3["endpoint"],
            "s3.access-key-id": s3["access_key_id"],
            "s3.secret-access-key": s3["secret_access_key"],
            "s3.region": s3.get("region", "us-east-1"),
            "s3.path-style-access": "true",
        })
    return load_catalog(conn.get("name", "cat"), **props)


def ensure_namespace(cat, ns):
    """Creates namespace ns unless it exists. Test writers run in parallel on one namespace, and
    SeaweedFS answers 500 ("attribute not found: s3tables.metadata") to a namespace another
    request is still creating (2 of 40 parallel creates, measured), so a server error here is
    retried for up to 5 s before it counts."""
    import time
    from pyiceberg.exceptions import ServerError
    for attempt in range(20):
        try:
            cat.create_namespace_if_not_exists(ns)
            return
        except ServerError:
            if attempt == 19:
                raise
            time.sleep(0.25)


def duckdb_connect(extension_dir):
    import duckdb

    con = duckdb.connect(config={
        "extension_directory": extension_dir,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": True,
    })
    con.execute("LOAD iceberg")
    con.execute("LOAD httpfs")
    return con


def duckdb_attach(con, conn, alias):
    """ATTACH a REST catalog (OAuth2 client credentials when conn has "credential")."""
    s3 = conn.get("s3")
    if s3:
        endpoint = s3["endpoint"].split("://", 1)[1]
        con.execute(f"""CREATE OR REPLACE SECRET s3_{alias} (TYPE S3, KEY_ID '{s3["access_key_id"]}',
            SECRET '{s3["secret_access_key"]}', REGION '{s3.get("region", "us-east-1")}',
            ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)""")
    if conn.get("credential"):
        client_id, client_secret = conn["credential"].split(":", 1)
        con.execute(f"""CREATE OR REPLACE SECRET ice_{alias} (TYPE ICEBERG, CLIENT_ID '{client_id}',
            CLIENT_SECRET '{client_secret}', OAUTH2_SERVER_URI '{conn["uri"]}/v1/oauth/tokens')""")
        con.execute(f"ATTACH '{conn['warehouse']}' AS {alias} (TYPE ICEBERG, ENDPOINT '{conn['uri']}', SECRET ice_{alias})")
    else:
        con.execute(f"ATTACH '{conn['warehouse']}' AS {alias} (TYPE ICEBERG, ENDPOINT '{conn['uri']}', AUTHORIZATION_TYPE 'none')")


def spark_session(classpath, **config):
    """A local Spark session (two cores, loopback only, no UI) with Iceberg's runtime on
    `classpath` (os.pathsep-joined jars) and `config` on top (`spark.` keys)."""
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.extraClassPath", classpath)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
    )
    for key, value in config.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
