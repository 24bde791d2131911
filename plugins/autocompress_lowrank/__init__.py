"""Builtin technique plugin: low-rank factorization of a ViT's block Linears (plain or activation-aware SVD).

Registered through the ``autocompress`` entry-point group like any third-party plugin.
"""

from autocompress.hookspecs import hookimpl

from autocompress_lowrank.factorize import Factors, svd_factors, whitened_factors
from autocompress_lowrank.modules import LowRankLinear, break_even_rank
from autocompress_lowrank.technique import METHODS, LowRankTechnique, factorize_layer, resolve_rank

__all__ = [
    "METHODS", "Factors", "LowRankLinear", "LowRankTechnique", "autocompress_register_techniques",
    "break_even_rank", "factorize_layer", "resolve_rank", "svd_factors", "whitened_factors",
]


@hookimpl
def autocompress_register_techniques(register):
    register(LowRankTechnique())
