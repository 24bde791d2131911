"""Builtin technique plugin: per-layer numeric formats for Linear layers.

Registered through the ``autocompress`` entry-point group like any third-party plugin.
"""

from autocompress.hookspecs import hookimpl

from autocompress_quantization.technique import FORMATS, QuantizationTechnique

__all__ = ["FORMATS", "QuantizationTechnique", "autocompress_register_techniques"]


@hookimpl
def autocompress_register_techniques(register):
    register(QuantizationTechnique())
