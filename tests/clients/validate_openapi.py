"""Validates JSON documents against a schema of an OpenAPI 3.1 description.

usage: validate_openapi.py OPENAPI_YAML SCHEMA_NAME JSON [JSON ...]
Prints {"errors": [...]} (empty when every document is valid).
"""
import json
import sys

import jsonschema
import yaml

from common import emit

spec = yaml.safe_load(open(sys.argv[1]))
name = sys.argv[2]
root = dict(spec)
root["$schema"] = "https://json-schema.org/draft/2020-12/schema"
root["$ref"] = f"#/components/schemas/{name}"
validator = jsonschema.Draft202012Validator(root)
errors = []
for i, text in enumerate(sys.argv[3:]):
    for e in validator.iter_errors(json.loads(text)):
        errors.append(f"document {i}: {'/'.join(str(p) for p in e.absolute_path)}: {e.message}")
emit({"errors": errors})
