"""The registry: which artifacts were made, from what, how, how good, and where they went.

A SQLite file (``$QCONV_HOME/registry.db``, default under the user's data dir) owned by
sqlite-utils; open it with ``sqlite-utils`` or Datasette to explore it. Tables and migrations:
:mod:`qconv.registry.migrations`; concurrency and transactions: :mod:`qconv.registry.db`.

    from qconv.registry import open_registry

    with open_registry() as registry:
        artifact_id = registry.record_artifact(manifest, "out/smollm2-nf4")
        registry.list_artifacts(method="bnb")
        registry.get_artifact(artifact_id[:6])
"""

from qconv.registry.db import (
    Registry,
    ResolvedArtifact,
    is_path_ref,
    open_registry,
    open_registry_readonly,
    resolve_artifact,
)
from qconv.registry.location import registry_path, user_data_dir
from qconv.registry.manifest_rows import artifact_id

__all__ = [
    "Registry",
    "ResolvedArtifact",
    "artifact_id",
    "is_path_ref",
    "open_registry",
    "open_registry_readonly",
    "registry_path",
    "resolve_artifact",
    "user_data_dir",
]
