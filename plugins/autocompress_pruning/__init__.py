"""Builtin technique plugin: structured pruning of ViT blocks (attention heads, MLP hidden channels).

Registered through the ``autocompress`` entry-point group like any third-party plugin.
"""

from autocompress.hookspecs import hookimpl

from autocompress_pruning.importance import CRITERIA
from autocompress_pruning.surgery import head_counts, mlp_widths
from autocompress_pruning.technique import PruningTechnique, kept_count

__all__ = ["CRITERIA", "PruningTechnique", "autocompress_register_techniques", "head_counts", "kept_count",
           "mlp_widths"]


@hookimpl
def autocompress_register_techniques(register):
    register(PruningTechnique())
