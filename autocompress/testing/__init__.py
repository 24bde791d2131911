"""Test helpers for plugin authors: the technique contract suite (``TechniqueContract``), to subclass in pytest,
and ``TechniquePlugin`` to register techniques defined in code.

Needs pytest (a test-time dependency); the rest of autocompress never imports this package.
"""

from autocompress.testing.plugins import TechniquePlugin
from autocompress.testing.technique_contract import DEFAULT_MODELS, ModelSpec, SpeedupClaim, TechniqueContract

__all__ = ["DEFAULT_MODELS", "ModelSpec", "SpeedupClaim", "TechniqueContract", "TechniquePlugin"]
