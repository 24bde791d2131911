"""Puts the top-level ``search_spaces/`` folder into the wheel as ``autocompress/_spaces/``, where
``autocompress.space`` finds the builtin spaces after ``pip install .``.

Only for a standard wheel: hatchling would also copy force-included files into an editable wheel, and there a
``site-packages/autocompress/`` folder without ``__init__.py`` is a namespace package that shadows the editable
redirect to the checkout (``editables`` appends its finder after the path finder). An editable install reads
``search_spaces/`` from the checkout instead.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SPACES_SOURCE = "search_spaces"
SPACES_IN_WHEEL = "autocompress/_spaces"


class SearchSpacesHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"][SPACES_SOURCE] = SPACES_IN_WHEEL
