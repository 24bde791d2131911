"""The sampler and pruner of the run's study (``search.sampler``, ``search.pruner``, ``search.objective``)."""

from __future__ import annotations

import optuna

from autocompress.config import SearchConfig
from autocompress.errors import InputError
from autocompress.search.early_stopping import resolve_pruner

__all__ = ["make_sampler", "make_pruner"]


def make_sampler(search: SearchConfig, seed: int | None = None, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """``parallel``: trials run concurrently (Ray, shared storage), so TPE treats running trials as bad results
    (constant liar) instead of proposing the same policy to several workers."""
    seed = search.seed if seed is None else seed
    if search.sampler == "tpe":
        # with the solver, its seeds (and the uncompressed model) are the start: TPE models around them at once
        startup = 1 + len(search.solver_fractions) if search.strategy == "solve" else 10
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup,
                                          constant_liar=parallel)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise InputError("search.sampler", f"unknown sampler {search.sampler!r}")


def make_pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    """Optuna's pruner for a single-objective study; a multi-objective one prunes with :class:`MedianRule`.

    Reports come at steps 25, 50, 100, ...: with ``min_resource=1`` and a reduction factor of 2, each report meets
    about one successive-halving rung, so a trial goes on only while it is in the better half at its step.
    """
    name = resolve_pruner(search.objective, search.pruner)
    if search.objective != "single" or name == "none":
        return optuna.pruners.NopPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
