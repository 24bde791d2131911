"""Builtin technique plugin: per-layer numeric formats for Linear layers.

Registered through the ``autocompress`` entry-point group like any third-party plugin.
"""

from autocompress.hookspecs import hookimpl

from autocompress_quantization.export import prepare_export
from autocompress_quantization.technique import FORMATS, QuantizationTechnique

__all__ = ["FORMATS", "QuantizationTechnique", "autocompress_prepare_export", "autocompress_register_techniques"]


@hookimpl
def autocompress_register_techniques(register):
    register(QuantizationTechnique())


@hookimpl
def autocompress_prepare_export(model, plan):
    prepare_export(model, plan)
