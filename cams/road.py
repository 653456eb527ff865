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
mode (LeRF, then MoRF, as its ``ROADCombined``), per percentile, per image, one [C, n] draw for n imputed pixels, on
the CPU. Everything else runs on the images' device, batched: the percentiles, and the imputation system solved by
conjugate gradients on the 8-neighbour stencil in float64 (the system is symmetric positive definite), to a relative
residual of ``SOLVE_TOLERANCE``; the scores are one batched no-grad forward per mode and percentile. On the CPU the
solve is SciPy's direct one (SuperLU), image by image, the faster there (``bench/road_solve.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
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
SOLVE_TOLERANCE = 1e-9  # relative residual of each image's solve: pixels within ~1e-7 of the direct solve's
CHECK_EVERY = 16  # solver iterations between convergence checks (each a host sync)
Confidence = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> a score per image [B]
Solver = Literal["auto", "direct", "iterative"]


def kept_pixels(saliency: Tensor, percentile: float) -> Tensor:
    """The pixels ROAD keeps at ``percentile``, bool [..., H, W] on the maps' device: per map, ``saliency <
    np.percentile(saliency, percentile)`` (linear interpolation between the two nearest ranks, as NumPy's)."""
    values = saliency.detach().float().flatten(-2)
    ordered = values.sort(-1).values.double()
    position = percentile / 100 * (values.shape[-1] - 1)
    low = int(position)
    high = min(low + 1, values.shape[-1] - 1)
    fraction = position - low
    a, b = ordered[..., low : low + 1], ordered[..., high : high + 1]
    # NumPy's _lerp: from the nearer end, so that the result is exactly a or b at fractions 0 and 1
    cut = a + (b - a) * fraction if fraction < 0.5 else b - (b - a) * (1 - fraction)
    return (values.double() < cut).view(saliency.shape)


def stencil(z: Tensor) -> Tensor:
    """The weighted sum of each pixel's 8 neighbours (``NEIGHBOURS``) of ``z`` [..., H, W], zero outside."""
    height, width = z.shape[-2:]
    padded = F.pad(z, (1, 1, 1, 1))
    total = torch.zeros_like(z)
    for dr, dc, weight in NEIGHBOURS:
        total += weight * padded[..., 1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]
    return total


def imputed_values(images: Tensor, kept: Tensor) -> Tensor:
    """The linear imputation of ``images`` [B, C, H, W] outside ``kept`` [B, H, W], float64, on their device: each
    unknown pixel equals the weighted mean of its neighbours inside the image (the weights of those outside are
    dropped), known neighbours fixed. That is (D - W) x = W v on the unknown pixels: symmetric positive definite
    (each group of unknown pixels borders a known one unless none is known: then the fill is 0), solved for every
    image and channel at once by Jacobi-preconditioned conjugate gradients."""
    unknown = (~kept).to(torch.float64)[:, None]  # [B, 1, H, W]
    known = images.to(torch.float64) * (1 - unknown)
    diagonal = stencil(torch.ones_like(unknown[:1]))  # the in-image neighbours' weights
    right = stencil(known) * unknown

    def operator(z: Tensor) -> Tensor:
        return (diagonal * z - stencil(z)) * unknown

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(den))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((-2, -1), keepdim=True)

    inverse = unknown / diagonal
    solution, residual = torch.zeros_like(right), right.clone()
    preconditioned = residual * inverse
    direction, rho = preconditioned.clone(), dot(residual, preconditioned)
    limit = (SOLVE_TOLERANCE * right.flatten(-2).norm(dim=-1)) ** 2
    for iteration in range(1, 20 * sum(images.shape[-2:]) + 1):  # CG needs O(side) iterations on a grid
        product = operator(direction)
        step = ratio(rho, dot(direction, product))
        solution += step * direction
        residual -= step * product
        preconditioned = residual * inverse
        rho, previous = dot(residual, preconditioned), rho
        direction = preconditioned + ratio(rho, previous) * direction
        if iteration % CHECK_EVERY == 0 and bool((dot(residual, residual).flatten(-3) <= limit).all()):
            break
    return solution


def imputation_system(image: Tensor, kept: np.ndarray) -> tuple[csc_matrix, np.ndarray, np.ndarray]:
    """The system of :func:`imputed_values` for one image [C, H, W] on the CPU, for SciPy: (A [n, n], b [n, C],
    the n unknown pixels' flat indices)."""
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


def direct_values(images: Tensor, kept: Tensor) -> Tensor:
    """:func:`imputed_values` by SciPy's direct sparse solve, image by image on the CPU."""
    host, known = images.detach().cpu(), kept.cpu().numpy()
    values = torch.zeros(host.shape, dtype=torch.float64)
    for b in range(len(host)):
        if known[b].all() or not known[b].any():  # nothing to fill; nothing anchors the fill (0, as iterated)
            continue
        matrix, right, unknown = imputation_system(host[b], known[b])
        solved = np.asarray(spsolve(matrix, right)).reshape(len(unknown), -1)
        values[b].view(host.shape[1], -1)[:, torch.from_numpy(unknown)] = torch.from_numpy(solved).T
    return values.to(images.device)


def impute(
    images: Tensor, kept: Tensor, generator: torch.Generator, noise: float = ROAD_NOISE, solver: Solver = "auto"
) -> Tensor:
    """``images`` [B, C, H, W] with every pixel not ``kept`` [B, H, W] replaced by the noisy linear imputation
    (plus N(0, ``noise``²) drawn from ``generator`` on the CPU, image by image). ``solver``: ``"iterative"``
    (:func:`imputed_values`, on the images' device), ``"direct"`` (:func:`direct_values`, SciPy), ``"auto"``: direct
    for CPU tensors, iterative elsewhere."""
    if solver not in ("auto", "direct", "iterative"):
        raise ValueError(f"solver must be auto, direct or iterative, got {solver!r}")
    direct = solver == "direct" or (solver == "auto" and images.device.type == "cpu")
    channels = images.shape[1]
    unknown = ~kept.flatten(1).cpu()
    draws = torch.zeros(images.shape[0], channels, unknown.shape[1])
    for b in range(len(images)):  # one [C, n] draw per image, in the reference's order
        draws[b][:, unknown[b]] = torch.randn(channels, int(unknown[b].sum()), generator=generator)
    values = direct_values(images, kept) if direct else imputed_values(images, kept)
    filled = values.float() + noise * draws.view(images.shape).to(images.device)
    return torch.where(kept[:, None], images, filled.to(images.dtype))


def road(
    confidence: Confidence,
    images: Tensor,
    maps: Tensor,
    base: Tensor,
    generator: torch.Generator,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
    solver: Solver = "auto",
) -> tuple[Tensor, Tensor]:
    """ROAD's MoRF and LeRF score changes of ``maps`` [B, H, W] on ``images`` [B, C, H, W], each [B] (float64):
    the mean over ``percentiles`` of ``confidence(imputed) - base`` (``base``: the images' scores); ``solver`` as
    :func:`impute` takes it."""
    changes: dict[str, Tensor] = {}
    for mode in ("lerf", "morf"):  # pytorch-grad-cam's ROADCombined order, so that seeded noise matches
        order = 1 - maps if mode == "lerf" else maps
        per_percentile = []
        for percentile in percentiles:
            imputed = impute(images.detach(), kept_pixels(order, percentile), generator, solver=solver)
            per_percentile.append(confidence(imputed).double() - base.double())
        changes[mode] = torch.stack(per_percentile).mean(0)
    return changes["morf"], changes["lerf"]
