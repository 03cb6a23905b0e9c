"""Weighted k-NN on frozen features: cosine similarity, k nearest, votes weighted by exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted class of every query row, from its k most cosine-similar training rows."""
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training feature")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start:start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, dtype=torch.float32, device=query.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, val_features, val_labels, num_classes: int,
                 k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> float:
    predicted = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature)
    return float((predicted == val_labels).float().mean()) if len(val_labels) else float("nan")
