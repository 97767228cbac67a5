"""One rule turns outputs into labels (model/metrics/labels.py): the metrics, the predictor and the
figures give the same labels for the same outputs, and those are the rule's known answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engines.figures import predict_tiles
from engines.sliding_window import Predictor
from model.metrics import labels_from_scores, predict_labels

CPU = torch.device("cpu")


class FixedLogits(torch.nn.Module):
    """A stand-in network whose segmentation output is the given logits, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.outc = torch.nn.Conv2d(1, logits.shape[1], 1)  # the predictor reads K from here
        self.head = self.fill_head = None

    def forward(self, image):
        return SimpleNamespace(seg=self.logits)


def logits_with_ties(k: int, seed: int) -> torch.Tensor:
    """(2, k, 12, 10) logits, clear of every threshold tested except on purpose: row 0 holds logit 0
    (probability exactly 0.5) and, for k = 3, classes 1 and 2 tied above class 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 12, 10, generator=g) * 4
    if k == 1:
        logits[:, 0, 0] = 0.0
    else:
        logits[:, 0, 0], logits[:, 1, 0], logits[:, 2, 0] = -1.0, 2.0, 2.0
    return logits


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_metrics_predictor_and_figures_make_the_same_labels(k, threshold):
    logits = logits_with_ties(k, seed=k)
    x = logits.double().numpy()
    if k == 1:
        expected = (1 / (1 + np.exp(-x[:, 0])) > threshold).astype(np.int64)  # strict: 0.5 is not above 0.5
        probs = torch.sigmoid(logits)
    else:
        expected = x.argmax(1)  # numpy: the first of tied classes
        probs = torch.softmax(logits, dim=1)
    assert (expected[:, 0] == (0 if k == 1 and threshold >= 0.5 else 1)).all()

    metrics = predict_labels(logits, threshold).numpy()
    predictor = Predictor(FixedLogits(logits), tile=12, overlap=0, batch_size=2, device=CPU)
    from_probs = np.stack([predictor.labels(p, threshold) for p in probs.numpy()])
    dataset = [{"image": torch.zeros(1, 12, 10), "mask": torch.zeros(12, 10, dtype=torch.long), "id": str(i)}
               for i in range(2)]
    figures = predict_tiles(FixedLogits(logits), dataset, [0, 1], CPU, None, False, threshold)["preds"]

    np.testing.assert_array_equal(metrics, expected)
    np.testing.assert_array_equal(from_probs, expected)
    np.testing.assert_array_equal(figures, expected)
    assert from_probs.dtype == np.uint8 and metrics.dtype == figures.dtype == np.int64


def test_labels_from_scores_refuses_a_bad_shape_or_threshold():
    with pytest.raises(ValueError, match=r"scores must be a \(B, K, \.\.\.\) tensor, got \(4,\)"):
        labels_from_scores(torch.zeros(4))
    with pytest.raises(ValueError, match=r"threshold must be a probability in \[0, 1\], got 1.5"):
        labels_from_scores(torch.zeros(2, 1, 3, 3), 1.5)
