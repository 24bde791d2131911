"""Builtin technique plugin: knowledge distillation as recovery training of the compressed student.

Registered through the ``autocompress`` entry-point group like any third-party plugin.
"""

from autocompress.hookspecs import hookimpl

from autocompress_distillation.technique import DistillationTechnique

__all__ = ["DistillationTechnique", "autocompress_register_techniques"]


@hookimpl
def autocompress_register_techniques(register):
    register(DistillationTechnique())
