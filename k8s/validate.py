"""Validates Kubernetes YAML against the API schemas of several Kubernetes versions.

Usage: validate.py --versions 1.29.0,1.31.0,1.33.0 FILE...

Each FILE may hold several documents; a List's items are validated one by one. Validation is
strict (unknown fields are errors), and a kind with no schema is an error too, so a typo in
apiVersion or kind cannot pass unseen. Run by k8s/validate.sh with kubernetes-validate
installed in its venv.
"""

import argparse
import sys

import kubernetes_validate
import yaml


def resources(doc):
    if isinstance(doc, dict) and doc.get("kind", "").endswith("List") and "items" in doc:
        for item in doc["items"] or []:
            yield from resources(item)
    elif doc is not None:
        yield doc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    versions = args.versions.split(",")
    failures = 0
    checked = 0
    for path in args.files:
        with open(path) as f:
            try:
                docs = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                print(f"FAIL {path}: not valid YAML: {e}")
                failures += 1
                continue
        for doc in docs:
            for resource in resources(doc):
                name = f"{resource.get('kind')}/{(resource.get('metadata') or {}).get('name')}"
                for version in versions:
                    checked += 1
                    try:
                        kubernetes_validate.validate(resource, version, strict=True)
                    except kubernetes_validate.SchemaNotFoundError:
                        failures += 1
                        print(f"FAIL {path}: {name}: no schema for {resource.get('apiVersion')} "
                              f"{resource.get('kind')} in Kubernetes {version}")
                    except kubernetes_validate.ValidationError as e:
                        failures += 1
                        where = "/".join(str(p) for p in e.path)
                        print(f"FAIL {path}: {name} (Kubernetes {version}) at {where or '/'}: "
                              f"{e.message}")
    print(f"k8s validate: {checked} checks of {len(args.files)} files against Kubernetes "
          f"{', '.join(versions)}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
