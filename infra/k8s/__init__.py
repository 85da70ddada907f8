"""KubeRay manifests (kustomize base, components, overlays), the vendored KubeRay CRD schemas and the
offline checks of both (validate.py). docs/deploy.md uses them."""
