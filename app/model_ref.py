"""Model references: the one parser for what `--model`, `--model-uri` and `serve.model_uri` accept.

``models:/NAME@ALIAS`` follows an alias (serving re-resolves it as the alias moves), ``models:/NAME/VERSION`` pins a
registered version, any other URI (``runs:/...``, ``s3://...``) is handed to MLflow, and anything else is a checkpoint
directory on disk. Light on purpose: `aipd --help` and the Serve config writer import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

REGISTRY_SCHEME = "models:/"

Kind = Literal["alias", "version", "uri", "path"]


@dataclass(frozen=True)
class ModelRef:
    uri: str
    kind: Kind
    name: str | None = None  # the registered model, for models:/ references
    alias: str | None = None
    version: str | None = None  # a number, or "latest"

    @property
    def in_registry(self) -> bool:
        return self.kind in ("alias", "version")

    def pinned(self, version: str) -> ModelRef:
        """The same registered model at one version: what an alias pointed at when it was resolved."""
        if self.name is None:
            raise ValueError(f"{self.uri} is not a registry reference")
        return parse_model_ref(version_uri(self.name, version))


def parse_model_ref(uri: str) -> ModelRef:
    if uri.startswith(REGISTRY_SCHEME):
        ref = uri.removeprefix(REGISTRY_SCHEME)
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return ModelRef(uri, "alias", name=name, alias=alias)
        name, _, version = ref.partition("/")
        return ModelRef(uri, "version", name=name, version=version or "latest")
    if "://" in uri or uri.startswith("runs:/"):
        return ModelRef(uri, "uri")
    return ModelRef(uri, "path")


def alias_uri(name: str, alias: str) -> str:
    return f"{REGISTRY_SCHEME}{name}@{alias}"


def version_uri(name: str, version: str) -> str:
    return f"{REGISTRY_SCHEME}{name}/{version}"
