"""autocompress-tome: token merging (ToMe) for timm Vision Transformers, as an autocompress technique plugin.

Installed with pip, it is found through the ``autocompress`` entry-point group (see this distribution's
``pyproject.toml``) and registers one technique, ``tome``, searchable per block.
"""

from autocompress.hookspecs import hookimpl

from autocompress_tome.technique import TokenMergingTechnique

__all__ = ["TokenMergingTechnique", "autocompress_register_techniques"]
__version__ = "0.1.0"


@hookimpl
def autocompress_register_techniques(register):
    register(TokenMergingTechnique())
