"""A plugin object for techniques defined in code (a test, a notebook), for ``load_plugins(extra=[...])``."""

from __future__ import annotations

from autocompress.hookspecs import hookimpl
from autocompress.technique import Technique


class TechniquePlugin:
    """Registers ``techniques`` through the same hook an installed plugin implements; ``name`` is the plugin's
    name in ``autocompress plugins`` and in error messages."""

    def __init__(self, name: str, *techniques: Technique) -> None:
        self.__name__ = name
        self._techniques = techniques

    @hookimpl
    def autocompress_register_techniques(self, register):
        for technique in self._techniques:
            register(technique)
