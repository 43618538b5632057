"""The MultiBox loss of PFJet-SSD, consistent with the softmax used at inference.

Differences from the reference (pfjet-ssd-reference §4.3, §10.9), each on purpose:
- classification is a softmax cross-entropy over [background, t, V, H] with label smoothing 0.1 — the
  probabilities inference uses (the reference trained per-class sigmoids and inferred a softmax);
- the normaliser is max(N_pos, 1), so a batch without positives gives a finite loss, not NaN;
- every image contributes at least ``min_negatives`` hard negatives, so events without any jet (QCD)
  still teach the background class (the reference mined 3 × 0 = 0 negatives there);
- the pT target is ln(pT / 1 TeV) (see :mod:`jetssd.anchors`), not pT divided by the hottest pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jetssd.train.config import LossConfig


@dataclass
class LossParts:
    """Loss terms of one batch (scalars), each already divided by ``norm`` = max(N_pos, 1).

    To average over many batches weight each by ``norm`` (a per-positive mean over the whole set): a plain
    mean of batch values would let a batch without positives (sum over its mined negatives divided by 1)
    dominate — e.g. a validation batch made only of QCD events.
    """

    total: torch.Tensor
    loc: torch.Tensor
    cls: torch.Tensor
    pt: torch.Tensor
    n_pos: int

    @property
    def norm(self) -> int:
        return max(self.n_pos, 1)

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "loc": float(self.loc), "cls": float(self.cls),
                "pt": float(self.pt)}


def hard_negative_mask(ce: torch.Tensor, positive: torch.Tensor, ratio: float, min_negatives: int) -> torch.Tensor:
    """Per image, the background anchors with the highest classification loss.

    Args:
        ce: [B, P] per-anchor cross-entropy against the target class (no smoothing).
        positive: [B, P] bool.
    Returns:
        [B, P] bool: the selected negatives, ratio × n_pos (at least ``min_negatives``) per image.
    """
    mining = ce.detach().masked_fill(positive, float("-inf"))
    order = mining.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    n_pos = positive.sum(dim=1, keepdim=True)
    n_neg = torch.clamp((n_pos.float() * ratio).long(), min=min_negatives)
    n_neg = torch.minimum(n_neg, (~positive).sum(dim=1, keepdim=True))
    return (rank < n_neg) & ~positive


def multibox_loss(loc_pred: torch.Tensor, cls_logits: torch.Tensor, reg_pred: torch.Tensor,
                  labels: torch.Tensor, loc_target: torch.Tensor, pt_target: torch.Tensor,
                  config: LossConfig) -> LossParts:
    """SSD loss with hard-negative mining.

    Args:
        loc_pred: [B, P, 2] predicted centre offsets (encoded as in :func:`jetssd.anchors.match`).
        cls_logits: [B, P, C + 1] raw logits, background first.
        reg_pred: [B, P, 1] or [B, P] predicted ln(pT / pt_scale).
        labels: [B, P] int64 target class (0 background).
        loc_target: [B, P, 2]; pt_target: [B, P] (used where labels > 0).
    """
    # The loss is computed in fp32 whatever the autocast dtype of the network.
    cls_logits = cls_logits.float()
    loc_pred = loc_pred.float()
    reg_pred = reg_pred.float().reshape(labels.shape)
    positive = labels > 0
    n_pos = int(positive.sum())
    norm = max(n_pos, 1)

    n_classes = cls_logits.shape[-1]
    ce = F.cross_entropy(cls_logits.reshape(-1, n_classes), labels.reshape(-1), reduction="none").view_as(labels)
    selected = positive | hard_negative_mask(ce, positive, config.neg_pos_ratio, config.min_negatives)
    cls_loss = F.cross_entropy(cls_logits[selected], labels[selected], reduction="sum",
                               label_smoothing=config.label_smoothing) / norm
    loc_loss = F.smooth_l1_loss(loc_pred[positive], loc_target[positive], reduction="sum", beta=1.0) / norm
    pt_loss = F.smooth_l1_loss(reg_pred[positive], pt_target[positive], reduction="sum", beta=1.0) / norm
    total = cls_loss + config.loc_weight * loc_loss + config.pt_weight * pt_loss
    return LossParts(total, loc_loss.detach(), cls_loss.detach(), pt_loss.detach(), n_pos)
