"""Render a kustomize overlay and check every object in it, offline, before `kubectl apply -k`:

    python -m infra.k8s.validate infra/k8s/overlays/object-storage [OVERLAY ...]

1. render: `kubectl kustomize OVERLAY` (kubectl's built-in kustomize, as `kubectl apply -k` uses)
2. schema: each object against its API schema, strictly (schema.py: KubeRay v1.7.0's CRDs for the
   ray.io/v1 kinds, an unknown or misspelled field is an error, as `--validate=strict` makes it)
3. names, labels and annotations (names.py), as the API server checks them
4. KubeRay's own rules (kuberay.py), with the feature gates of kuberay-operator-values.yaml

Prints one line per problem (`KIND/NAME: path: message`) and exits 1 if there is any, else one
line per overlay and 0. tests/infra/test_k8s.py runs the same functions on the overlays here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from infra.k8s.kuberay import check_kuberay, load_feature_gates
from infra.k8s.names import check_metadata
from infra.k8s.schema import SchemaSet, load_crd_schemas

OVERLAYS_DIR = Path(__file__).resolve().parent / "overlays"


def render(overlay: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k OVERLAY` would send, in its order."""
    try:
        done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ValueError("kubectl is not on PATH; kubectl 1.32 (kustomize v5.5) renders the overlays") from None
    if done.returncode != 0:
        raise ValueError(f"kubectl kustomize {overlay}: {done.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


class Validator:
    """Schema, name and KubeRay checks; built once (the CRD schemas are large)."""

    def __init__(self, gates: dict[str, bool] | None = None) -> None:
        self.schemas = SchemaSet(load_crd_schemas())
        self.gates = load_feature_gates() if gates is None else gates

    def problems(self, obj: dict[str, Any]) -> list[str]:
        """One object's problems, `path: message`; the KubeRay rules only once the schema holds."""
        problems = self.schemas.problems(obj) + check_metadata(obj)
        return problems or check_kuberay(obj, self.gates)

    def check_all(self, objects: list[dict[str, Any]]) -> list[str]:
        """Every problem of a rendered overlay, `KIND/NAME: path: message`, duplicates included."""
        problems, seen = [], set()
        for obj in objects:
            ident = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
            if ident in seen:
                problems.append(f"{ident}: (object): defined twice")
            seen.add(ident)
            problems += [f"{ident}: {problem}" for problem in self.problems(obj)]
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.k8s.validate", description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", type=Path, help=f"kustomize folders (default: every one in {OVERLAYS_DIR})")
    args = parser.parse_args(argv)
    overlays = args.overlays or sorted(path for path in OVERLAYS_DIR.iterdir() if (path / "kustomization.yaml").is_file())
    validator = Validator()
    failed = False
    for overlay in overlays:
        try:
            objects = render(overlay)
        except ValueError as exc:
            print(f"{overlay}: {exc}", file=sys.stderr)
            return 2
        problems = validator.check_all(objects)
        for problem in problems:
            print(f"{overlay}: {problem}")
        if not problems:
            print(f"{overlay}: {len(objects)} objects valid")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
