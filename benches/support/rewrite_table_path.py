"""Iceberg's own metadata rewrite (the Spark action RewriteTablePath) on a table, timed.

usage: rewrite_table_path.py CLASSPATH LOCATION TARGET_PREFIX STAGING ROUNDS

Loads the table at LOCATION (HadoopTables) and rewrites every metadata file with
LOCATION replaced by TARGET_PREFIX into STAGING, ROUNDS times in one Spark session.
Prints one line per round: `rewrite_table_path SECONDS`.
"""
import os
import shutil
import sys
import time

# The Spark session of the test clients.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "clients"))
from common import spark_session  # noqa: E402

classpath, location, target, staging, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
spark = spark_session(classpath, **{"spark.driver.memory": "4g"})
jvm = spark._jvm
for _ in range(rounds):
    shutil.rmtree(staging.removeprefix("file:"), ignore_errors=True)
    table = jvm.org.apache.iceberg.hadoop.HadoopTables(spark._jsc.hadoopConfiguration()).load(location)
    started = time.monotonic()
    action = jvm.org.apache.iceberg.spark.actions.SparkActions.get(spark._jsparkSession).rewriteTablePath(table)
    action.rewriteLocationPrefix(location, target).stagingLocation(staging).execute()
    print("rewrite_table_path %.3f" % (time.monotonic() - started), flush=True)
