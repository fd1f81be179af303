"""Reading configs/: every YAML document, the containers in them, and their args."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SERVER_POD = CONFIGS / "konnectivity-server.yaml"
AGENT_DAEMONSET = CONFIGS / "konnectivity-agent.yaml"
RBAC = CONFIGS / "konnectivity-rbac.yaml"
EGRESS = CONFIGS / "egress-selector-configuration.yaml"
APISERVER_PATCH = CONFIGS / "kube-apiserver-patch.yaml"


@dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index}({self.kind})"


def yaml_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path | None = None) -> list[Document]:
    found = []
    for file in [path] if path else yaml_files():
        for index, body in enumerate(yaml.safe_load_all(file.read_text())):
            if body is not None:
                found.append(Document(file, index, body))
    return found


def pod_spec(doc: Document) -> dict[str, Any]:
    body = doc.body
    return body["spec"]["template"]["spec"] if "template" in body.get("spec", {}) else body["spec"]


def containers(doc: Document) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def only_container(path: Path) -> tuple[Document, dict[str, Any]]:
    (doc,) = documents(path)
    (container,) = containers(doc)
    return doc, container


def flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` and bare `--name` (value "true") as a dict."""
    values = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        values[name] = value if sep else "true"
    return values


def rewrite(args: list[str], replacements: dict[str, str]) -> list[str]:
    """The args with some flags' values replaced; every replaced flag must be present."""
    missing = set(replacements) - set(flag_values(args))
    if missing:
        raise KeyError(f"flags not in the manifest: {sorted(missing)}")
    return [f"{arg.partition('=')[0]}={replacements[arg.partition('=')[0]]}"
            if arg.partition("=")[0] in replacements else arg for arg in args]
