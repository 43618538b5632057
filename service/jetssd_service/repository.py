"""The model variants the gateway can serve: ``<model_repository>/pfjet_ssd_<variant>/<version>/``.

The repository is the one Triton serves (DESIGN §4.5), so its ``pfjet_ssd_<variant>`` directories are the
list of variants for every backend; each version directory's ``metadata.json`` (written by ``jetssd export``)
gives the version and the test-set metrics shown by ``GET /v1/models``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetssd.inference import METADATA_FILE, read_metadata

log = logging.getLogger(__name__)

SSD_PREFIX = "pfjet_ssd_"
"""Directory prefix of the exported detector of a variant (the ONNX graph + metadata)."""


def ensemble_name(variant: str) -> str:
    """Triton ensemble of a variant (image → jets): ``pfjet_<variant>``."""
    return f"pfjet_{variant}"


@dataclass(frozen=True)
class ModelEntry:
    """One variant of the repository: its highest version directory and a summary of its metadata."""

    variant: str
    version: int
    versions: tuple[int, ...]
    version_dir: Path
    metadata: dict[str, Any] = field(repr=False)

    @property
    def summary_metrics(self) -> dict[str, Any]:
        """AP on the test set (reference 11-point, VOC, COCO) and the test-set size, when recorded."""
        metrics = self.metadata.get("metrics") or {}
        model = metrics.get("model") or {}
        out: dict[str, Any] = {}
        if "ap" in model:
            out["ap"] = model["ap"]
        test_set = metrics.get("test_set") or {}
        if "events" in test_set:
            out["test_events"] = test_set["events"]
        return out

    @property
    def description(self) -> str:
        network = self.metadata.get("network") or {}
        complexity = self.metadata.get("complexity") or {}
        parts = [f"PFJet-SSD {self.variant}"]
        if "parameters" in complexity:
            parts.append(f"{complexity['parameters']:,} parameters")
        if "activation" in network:
            parts.append(f"activation {network['activation']}")
        return ", ".join(parts)


class ModelRepository:
    """The variants found in ``root`` (scanned once, at construction).

    A variant directory without a readable version is skipped with a warning, so one broken export does not
    take the others down.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._entries: dict[str, ModelEntry] = {}
        if not self.root.is_dir():
            log.warning("model repository %s does not exist: no models to serve", self.root)
            return
        for model_dir in sorted(self.root.glob(f"{SSD_PREFIX}*")):
            entry = self._read(model_dir)
            if entry is not None:
                self._entries[entry.variant] = entry

    @staticmethod
    def _read(model_dir: Path) -> ModelEntry | None:
        versions = sorted(int(p.name) for p in model_dir.iterdir()
                          if p.is_dir() and p.name.isdigit() and (p / METADATA_FILE).is_file())
        if not versions:
            log.warning("%s: no version directory with %s, skipped", model_dir, METADATA_FILE)
            return None
        version_dir = model_dir / str(versions[-1])
        try:
            metadata = read_metadata(version_dir)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable metadata, skipped (%s)", version_dir, exc)
            return None
        variant = model_dir.name.removeprefix(SSD_PREFIX)
        return ModelEntry(variant, versions[-1], tuple(versions), version_dir, metadata)

    @property
    def variants(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, variant: object) -> bool:
        return variant in self._entries

    def __getitem__(self, variant: str) -> ModelEntry:
        return self._entries[variant]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())
