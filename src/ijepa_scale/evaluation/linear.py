"""Linear probe: multinomial logistic regression on standardised frozen features (full-batch L-BFGS).

The L2 strength is chosen on a held-out part of the training features (never the validation set):
the grid widens past an edge while the best value sits on it, then the probe is refit on all the
training features and scored on the validation features. Few-shot probes choose it by stratified
cross-validation inside the labelled shots.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger("ijepa_scale")

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# Few labelled images want stronger regularisation; the same widening applies.
SHOT_L2_GRID = (1e1, 1e0, 1e-1, 1e-2, 1e-3)
L2_STEP = 10.0  # the grid widens by this factor per added value
L2_BOUNDS = (1e-9, 1e3)  # it never widens past these
# One image per class cannot be split for cross-validation. A strong L2 makes the probe close to a
# nearest-class-mean classifier on the standardised features, the usual one-shot rule.
ONE_SHOT_L2 = 1.0
CV_FOLDS = 5
HOLDOUT_FRACTION = 0.2


def standardise(train: torch.Tensor, *others: torch.Tensor, stats: Optional[tuple] = None) -> list[torch.Tensor]:
    """Each column to zero mean, unit std (of `train`, or the given (mean, std))."""
    mean, std = stats if stats is not None else feature_stats(train)
    return [(x - mean) / std for x in (train, *others)]


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # constant dimensions stay 0 instead of dividing by 0


# L-BFGS iterations per fit: 300 stopped short of the optimum on 60,000 x 192 features (the demo's probe
# read 83.5 % after 300 and 84.0 % after 1,000 or 3,000).
MAX_ITER = 1000
# A few-shot fit (at most a few thousand rows) converges within this unless its rows are separable and
# its L2 weak; then L-BFGS only creeps toward a larger weight norm, which cross-validation does not pick.
SHOT_MAX_ITER = 200


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = MAX_ITER,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_eval: Optional[Callable[[float], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 * |W|^2 (bias not penalised); returns (W [C, D], b [C]).
    `on_eval(fraction)`: called after each loss evaluation with the fraction of the evaluation budget used."""
    if init is None:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype)
        bias = torch.zeros(num_classes, dtype=x.dtype)
    else:
        weight, bias = (t.detach().clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    max_eval = max_iter * 5 // 4  # torch's default
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_eval, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        evals[0] += 1
        if on_eval is not None:
            on_eval(min(1.0, evals[0] / max_eval))
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((x @ weight.T + bias).argmax(dim=1) == y).float().mean())


def select_l2(score: Callable, grid=L2_GRID, step: float = L2_STEP, bounds=L2_BOUNDS,
              on_fit: Optional[Callable[[int], None]] = None) -> dict:
    """The L2 with the best score, on a grid that widens past an edge while the best value sits on it.

    `score(l2, init)` -> (score, state): `init` is the state of the nearest L2 scored so far (a warm
    start), or None. Ties go to the stronger regularisation. `on_fit(extra)` is called when `extra` more
    values join the grid. Returns {l2, scores: {l2: score}, grid: (lo, hi), at_bound: bool, widened: int}.
    """
    lo, hi = bounds
    todo = sorted((v for v in grid if lo <= v <= hi), reverse=True)  # strongest first: each warm-starts the next
    if not todo:
        raise ValueError(f"no L2 of {grid} lies within {bounds}")
    scores, states, widened = {}, {}, 0

    def run(l2):
        near = min(states, key=lambda v: abs(math.log(v / l2))) if states else None
        scores[l2], states[l2] = score(l2, states.get(near))

    for l2 in todo:
        run(l2)
    while True:
        best = max(scores, key=lambda v: (scores[v], v))
        if best == min(scores) and best / step >= lo * (1 - 1e-9):
            new = best / step
        elif best == max(scores) and best * step <= hi * (1 + 1e-9):
            new = best * step
        else:
            break
        widened += 1
        if on_fit is not None:
            on_fit(1)
        run(new)
    at_bound = best in (min(scores), max(scores)) and len(scores) > 1
    return {"l2": best, "scores": dict(sorted(scores.items(), reverse=True)), "grid": (min(scores), max(scores)),
            "at_bound": at_bound, "widened": widened, "state": states[best]}


def describe_selection(selection: dict) -> str:
    """E.g. '1e-06..0.1, widened by 1' or '1e-09..0.1, best at the bound'."""
    lo, hi = selection["grid"]
    text = f"{lo:g}..{hi:g}"
    if selection["widened"]:
        text += f", widened by {selection['widened']}"
    if selection["at_bound"]:
        text += ", best at the bound"
    return text


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, l2_grid=L2_GRID, holdout_fraction: float = HOLDOUT_FRACTION,
                 seed: int = 0, max_iter: int = MAX_ITER, l2_bounds=L2_BOUNDS, desc: str = "linear probe",
                 progress: Optional[Callable[[float], None]] = None) -> dict:
    """Returns {accuracy, l2, holdout: {l2: accuracy}, selection} (accuracy on the validation features).
    `progress(fraction)`: told how much of the work is done, an estimate while the grid may still widen."""
    if len(train_x) < 2:
        raise ValueError("the linear probe needs at least 2 training features")
    train_x, val_x = (t.float() for t in (train_x, val_x))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(len(train_x) * holdout_fraction)))
    hold, fit = order[:n_hold], order[n_hold:]
    fit_x, hold_x = standardise(train_x[fit], train_x[hold])
    fits, planned = [0], [len(l2_grid) + 1]  # the grid's fits and the final refit

    def tick(fraction):
        if progress is not None:
            progress(min(1.0, (fits[0] + fraction) / planned[0]))

    def score(l2, init):
        state = fit_logistic(fit_x, train_y[fit], num_classes, l2, max_iter=max_iter, init=init, on_eval=tick)
        fits[0] += 1
        return accuracy(*state, hold_x, train_y[hold]), state

    def grow(extra):
        planned[0] += extra

    selection = select_l2(score, l2_grid, bounds=l2_bounds, on_fit=grow)
    best = selection["l2"]
    logger.info("%s: held-out accuracy per L2 %s -> L2 %g (grid %s)", desc,
                ", ".join(f"{l2:g}: {acc:.4f}" for l2, acc in selection["scores"].items()), best,
                describe_selection(selection))
    all_x, val_x = standardise(train_x, val_x)
    # Warm-started from the chosen fit: standardised by nearly the same statistics, it is close.
    weight, bias = fit_logistic(all_x, train_y, num_classes, best, max_iter=max_iter, init=selection.pop("state"),
                                on_eval=tick)
    fits[0] += 1
    return {"accuracy": accuracy(weight, bias, val_x, val_y), "l2": best, "holdout": selection["scores"],
            "selection": selection}


# ------------------------------------------------------------------------------------------- few-shot
def sample_shots(labels: torch.Tensor, shots: int, seed: int, num_classes: int) -> torch.Tensor:
    """Indices of exactly `shots` samples of every class (sorted), drawn without replacement by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(f"--shots {shots}: class {c} has only {len(members)} training image(s)")
        picked.append(members[torch.randperm(len(members), generator=gen)[:shots]])
    return torch.cat(picked).sort().values


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """`folds` index sets; each class's samples are dealt round-robin, so every fold holds every class
    when each class has at least `folds` samples."""
    gen = torch.Generator().manual_seed(seed)
    parts = [[] for _ in range(folds)]
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        for i, index in enumerate(members.tolist()):
            parts[i % folds].append(index)
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def few_shot_probe(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
                   shots: int, stats: tuple, seed: int = 0, max_iter: int = SHOT_MAX_ITER) -> dict:
    """The probe fitted on the labelled shots `x`, `y` (`shots` per class), scored on the validation features.

    `stats`: the (mean, std) used to standardise; the caller takes them from all training features,
    which needs no label. L2: stratified `min(shots, 5)`-fold cross-validation inside the shots (no other
    label is used) on SHOT_L2_GRID, widened as in `select_l2`; one shot per class uses ONE_SHOT_L2.
    Returns {accuracy, l2, selection (None for one shot)}.
    """
    x, val_x = standardise(x.float(), val_x.float(), stats=stats)
    selection = None
    if shots == 1:
        best = ONE_SHOT_L2
    else:
        folds = stratified_folds(y, min(shots, CV_FOLDS), seed)
        splits = []
        for held in folds:
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            splits.append((keep.nonzero().flatten(), held))

        def score(l2, init):
            states, correct = [], 0.0
            for i, (fit, held) in enumerate(splits):
                state = fit_logistic(x[fit], y[fit], num_classes, l2, max_iter=max_iter,
                                     init=None if init is None else init[i])
                states.append(state)
                correct += accuracy(*state, x[held], y[held]) * len(held)
            return correct / len(y), states

        selection = select_l2(score, SHOT_L2_GRID)
        selection.pop("state")
        best = selection["l2"]
    weight, bias = fit_logistic(x, y, num_classes, best, max_iter=max_iter)
    return {"accuracy": accuracy(weight, bias, val_x, val_y), "l2": best, "selection": selection}
