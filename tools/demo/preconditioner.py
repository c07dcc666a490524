"""A fixed linear map on the tower's features while stage 2 trains, folded into the projector at save.

The demo tower's patch features are one huge direction (85% of the token variance) plus small ones,
and colour lives in the small ones (1.5%). Training the projector on standardised or whitened
features changes only how the optimiser sees them; at save the map is folded into the projector's
first linear layer, so the checkpoint reads raw tower features like any llava-hf LLaVA.
"""
from __future__ import annotations

import torch


def preconditioner(feats: torch.Tensor, whiten_ridge: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M) such that stage 2 trains the projector on (x - mean) @ M instead of the raw tower features x.

    whiten_ridge None: per-channel standardisation (M diagonal). Otherwise ridge-regularised PCA
    whitening, M = (C + ridge * mean eigenvalue * I)^-1/2 of the token covariance C: the raw
    features are one direction (85% of the variance) plus small ones that hold colour (1.5%) and
    shape (3%); whitened with ridge 0.1 those shares become 17% and 10% (README).
    """
    flat = feats.flatten(0, -2).double()
    mean = flat.mean(0)
    if whiten_ridge is None:
        return mean.float(), torch.diag(1 / flat.std(0).clamp_min(1e-6)).float()
    centred = flat - mean
    evals, evecs = torch.linalg.eigh(centred.T @ centred / len(centred))
    scale = (evals.clamp_min(0) + whiten_ridge * evals.clamp_min(0).mean()) ** -0.5
    return mean.float(), ((evecs * scale) @ evecs.T).float()


@torch.no_grad()
def fold_preconditioner(projector: torch.nn.Module, mean: torch.Tensor, m: torch.Tensor) -> None:
    """Make projector(x) compute what it was trained to compute on (x - mean) @ m: fold the map into
    its first linear layer, so the saved checkpoint reads raw tower features like any LLaVA."""
    lin = projector.linear_1
    if lin.bias is None:
        raise ValueError("a preconditioned projector needs a bias to fold the mean into")
    lin.weight.copy_(lin.weight @ m.T)
    lin.bias.sub_(lin.weight @ mean)
