"""ROAD: RemOve And Debias (Rong et al., ICML 2022), a perturbation metric that does not reward blur artefacts.

Deletion paints pixels a constant colour, and a model can react to the sharp edges of the painted region more than
to what was removed, so a map can score well by where its edges fall. ROAD fills each removed pixel instead with
the weighted mean of its 8 neighbours (1/6 for the 4 direct ones, 1/12 for the diagonals) solved jointly over all
removed pixels, a sparse linear system per image, plus a little noise (*noisy linear imputation*), so the filled
region carries no edge of its own and the removed information is gone.

At each percentile p, as pytorch-grad-cam's ``metrics/road.py`` (Leemann's reference code) defines it:
- **MoRF** (most relevant first): the pixels where ``map < percentile(map, p)`` are kept (p% of them, the least
  relevant), the rest imputed;
- **LeRF** (least relevant first): the same on ``1 - map``, so the p% most relevant pixels are kept;
- each gives the change of the score, ``score(imputed) - score(image)``, averaged over the percentiles; a
  faithful map makes MoRF fall far (removing what matters) and LeRF little: **combined** = (LeRF - MoRF) / 2,
  higher is better.

The noise is drawn from a ``torch.Generator`` the caller seeds (pytorch-grad-cam draws from the global RNG): per
mode (LeRF, then MoRF, as its ``ROADCombined``), per percentile, per image, one [C, n] draw for n imputed pixels.
The solve runs on the CPU (SciPy's SuperLU), image by image; the scores are one batched no-grad forward per mode
and percentile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor

ROAD_PERCENTILES = (20, 40, 60, 80)  # pytorch-grad-cam's averagers take 10, 20, ..., 90: four cost less than half
ROAD_NOISE = 0.01  # the reference code's: the standard deviation of the noise added to the imputed pixels
# (row offset, column offset, weight) of the neighbours in the imputation: the reference code's
NEIGHBOURS = (
    (1, 1, 1 / 12),
    (0, 1, 1 / 6),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
)
Confidence = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> a score per image [B]


def kept_pixels(saliency: Tensor, percentile: float) -> np.ndarray:
    """The pixels ROAD keeps at ``percentile``: ``saliency < np.percentile(saliency, percentile)``, bool [H, W]."""
    values = saliency.detach().cpu().float().numpy()
    return values < np.percentile(values, percentile)


def imputation_system(image: Tensor, kept: np.ndarray) -> tuple[csc_matrix, np.ndarray, np.ndarray]:
    """The linear imputation of ``image`` [C, H, W] (on the CPU) outside ``kept`` [H, W]: (A [n, n], b [n, C], the
    n unknown pixels' flat indices), A x = b saying that each unknown pixel equals the weighted mean of its
    neighbours inside the image (the weights of those outside are dropped), known neighbours entering b."""
    height, width = kept.shape
    known = kept.reshape(-1)
    unknown = np.flatnonzero(~known)
    variable = np.full(known.size, -1, dtype=np.int64)
    variable[unknown] = np.arange(len(unknown))
    flat = image.reshape(image.shape[0], -1).double().numpy()
    rows, columns = unknown // width, unknown % width
    total = np.ones(len(unknown))
    right = np.zeros((len(unknown), image.shape[0]))
    entries_row, entries_column, entries_value = [], [], []
    for dr, dc, weight in NEIGHBOURS:
        r, c = rows + dr, columns + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        total[~inside] -= weight
        equation = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        is_known = known[neighbour]
        right[equation[is_known]] -= weight * flat[:, neighbour[is_known]].T
        entries_row.append(equation[~is_known])
        entries_column.append(variable[neighbour[~is_known]])
        entries_value.append(np.full(int((~is_known).sum()), weight))
    diagonal = np.arange(len(unknown))
    matrix = csc_matrix(
        (
            np.concatenate([*entries_value, -total]),
            (np.concatenate([*entries_row, diagonal]), np.concatenate([*entries_column, diagonal])),
        ),
        shape=(len(unknown), len(unknown)),
    )
    return matrix, right, unknown


def impute(image: Tensor, kept: np.ndarray, generator: torch.Generator, noise: float = ROAD_NOISE) -> Tensor:
    """``image`` [C, H, W] (on the CPU) with every pixel not ``kept`` [H, W] replaced by the noisy linear
    imputation (:func:`imputation_system` solved, plus N(0, ``noise``²) drawn from ``generator``)."""
    if kept.all():
        return image.clone()
    matrix, right, unknown = imputation_system(image, kept)
    solved = torch.from_numpy(np.asarray(spsolve(matrix, right)).reshape(len(unknown), -1)).float().T
    filled = image.reshape(image.shape[0], -1).clone()
    filled[:, torch.from_numpy(unknown)] = (
        solved + noise * torch.randn(solved.shape, generator=generator, dtype=solved.dtype)
    ).to(image.dtype)
    return filled.view_as(image)


def road(
    confidence: Confidence,
    images: Tensor,
    maps: Tensor,
    base: Tensor,
    generator: torch.Generator,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
) -> tuple[Tensor, Tensor]:
    """ROAD's MoRF and LeRF score changes of ``maps`` [B, H, W] on ``images`` [B, C, H, W], each [B] (float64):
    the mean over ``percentiles`` of ``confidence(imputed) - base`` (``base``: the images' scores)."""
    host = images.detach().cpu()
    changes: dict[str, Tensor] = {}
    for mode in ("lerf", "morf"):  # pytorch-grad-cam's ROADCombined order, so that seeded noise matches
        order = 1 - maps if mode == "lerf" else maps
        per_percentile = []
        for percentile in percentiles:
            imputed = torch.stack(
                [impute(host[b], kept_pixels(order[b], percentile), generator) for b in range(len(images))]
            )
            per_percentile.append(confidence(imputed.to(images.device)).double() - base.double())
        changes[mode] = torch.stack(per_percentile).mean(0)
    return changes["morf"], changes["lerf"]
