"""Hyper-parameters of the PFJet-SSD network (plain stdlib: importable without torch).

The configuration is part of a model artifact's metadata (DESIGN §4.4), so it round-trips through JSON
with :meth:`NetConfig.to_dict` / :meth:`NetConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("prelu", "relu", "leaky_relu", "relu6")
"""Accepted values of :attr:`NetConfig.activation`."""
NORMALISATIONS = ("log1p", "none")
"""Accepted values of :attr:`NetConfig.normalisation`."""

PRUNED_WIDTHS: tuple[int, ...] = (29, 55, 88, 85, 128, 128, 128, 128, 128, 128, 128)
"""Conv-block output widths of the reference's pruned ``net-config-last.yml`` (reference §3.2)."""
FULL_WIDTHS: tuple[int, ...] = (32, 64, 128, 128, 256, 512, 512, 512, 512, 1024, 1024)
"""Conv-block output widths of the reference's unpruned ``net-config.yml`` (reference §3.2)."""
N_BLOCKS = 11
"""Conv blocks of the training graph: idx 0, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14 of the reference's table."""
N_INFERENCE_BLOCKS = 9
"""Conv blocks of the inference graph (idx 0 … 11): the last two widths belong to the training-only part."""


@dataclass(frozen=True)
class NetConfig:
    """Architecture choices of :class:`jetssd.model.network.PFJetSSD`.

    Attributes:
        widths: the 11 conv-block output widths in network order (reference §3.2): idx 0 (conv_bn), then
            the conv_dw blocks idx 2, 3, 4, 6, 7, 8, 10, 11 (source 1 = ``widths[8]``) and the training-only
            idx 13, 14 (source 2 = ``widths[10]``).
        activation: ``"prelu"`` (per-channel, init 0.25, like the reference), ``"relu"``, ``"leaky_relu"``
            (fixed slope :data:`jetssd.model.layers.LEAKY_SLOPE`) or ``"relu6"``.
        circular_phi: pad φ circularly (and η with zeros) in every 3×3 conv, because φ is periodic
            (fixes reference §10.7); ``False`` pads both axes with zeros like the reference.
        dropblock: DropBlock(3×3) drop probability after the first conv; identity in eval.
        n_classes: foreground classes (t, V, H); the classifier has ``n_classes + 1`` logits, background first.
        normalisation: the model's first op. ``"log1p"``: x ← log1p(x / 1 GeV) on the raw GeV image, a
            fixed, monotone, quantization-friendly compression of the pT/ET range (replaces the reference's
            per-event z-score, §10.5); ``"none"``: the raw image goes in unchanged.
    """

    widths: tuple[int, ...] = PRUNED_WIDTHS
    activation: str = "prelu"
    circular_phi: bool = True
    dropblock: float = 0.1
    n_classes: int = 3
    normalisation: str = "log1p"

    def __post_init__(self) -> None:
        # JSON gives lists back: store a tuple so the frozen config stays hashable and comparable.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != N_BLOCKS or any(w < 1 for w in self.widths):
            raise ValueError(f"widths: expected {N_BLOCKS} positive ints, got {self.widths}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation: expected one of {NORMALISATIONS}, got {self.normalisation!r}")
        if not 0.0 <= self.dropblock < 1.0:
            raise ValueError(f"dropblock: expected a probability in [0, 1), got {self.dropblock}")
        if self.n_classes < 1:
            raise ValueError(f"n_classes: expected ≥ 1, got {self.n_classes}")

    @property
    def source_widths(self) -> tuple[int, int]:
        """Channels of source 1 (after idx 11) and source 2 (after idx 14)."""
        return self.widths[N_INFERENCE_BLOCKS - 1], self.widths[N_BLOCKS - 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``widths`` as a list)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_dict`. Unknown keys are an error, missing keys take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"NetConfig: unknown keys {sorted(unknown)}")
        return cls(**d)
