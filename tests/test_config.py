"""The config's schema (autocompress/config.py through autocompress/schema.py), seen from Python: what the command
line battery (test_bad_input.py) cannot reach -- values set on a config object after it was read."""

from __future__ import annotations

import pytest

from autocompress.config import RunConfig, config_from_dict, load_config, validate
from autocompress.errors import InputError


def test_a_value_set_from_python_after_reading_is_checked_like_the_files():
    config = config_from_dict({"model": {"name": "vit_tiny_patch16_224"}})
    config.target.threads = 0
    with pytest.raises(InputError) as info:
        validate(config)
    assert str(info.value) == "config.target.threads: must be at least 1, got 0"
    config = RunConfig()
    config.model.name = "vit_tiny_patch16_224"
    config.search.sampler = "grid"
    with pytest.raises(InputError) as info:
        validate(config)
    assert info.value.field == "config.search.sampler" and "'grid'" in info.value.message


def test_a_whole_number_given_for_seconds_becomes_seconds_and_overrides_are_checked(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {name: vit_tiny_patch16_224}\nsearch: {timeout_s: 60}\n")
    config = load_config(path, overrides={"search.sensitivity_seconds": 30})
    assert isinstance(config.search.timeout_s, float) and config.search.timeout_s == 60.0
    assert isinstance(config.search.sensitivity_seconds, float)
    with pytest.raises(InputError) as info:
        load_config(path, overrides={"target.repeats": "many"})
    assert str(info.value) == "config.target.repeats: must be an integer, got 'many'"


def test_an_unknown_key_in_a_section_names_the_keys_that_section_has():
    with pytest.raises(InputError) as info:
        config_from_dict({"model": {"name": "m"}, "target": {"thread": 2}})
    assert info.value.field == "config.target.thread"
    assert "threads" in info.value.message and "batch_size" in info.value.message


def test_an_unknown_key_is_worded_alike_in_a_file_a_section_an_override_and_a_space():
    """One wording (schema.unknown_key) whether the file, a section, a command-line override or a space names a key
    that does not exist, each listing what may be said there."""
    from autocompress.config import set_dotted
    from autocompress.space import SearchSpace

    def message(call) -> str:
        with pytest.raises(InputError) as info:
            call()
        return info.value.message

    config = config_from_dict({"model": {"name": "m"}})
    messages = [
        message(lambda: config_from_dict({"modle": {}})),
        message(lambda: config_from_dict({"model": {"name": "m"}, "search": {"trails": 3}})),
        message(lambda: set_dotted(config, "search.trails", 3)),
        message(lambda: set_dotted(config, "serch.trials", 3)),
        message(lambda: SearchSpace.from_dict({"techniques": {}, "extra": 1})),
    ]
    assert all(m.startswith("unknown key (expected one of: ") for m in messages), messages
    assert "model, data" in messages[0] and "trials" in messages[1] and messages[1] == messages[2]
    assert "search.<key>" in messages[3] and "techniques" in messages[4]
