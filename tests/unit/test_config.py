"""The config schema: YAML + dotlist loading, and errors that name the dotted key."""

from __future__ import annotations

import pytest

from ift_dist.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.data.max_length == 2048
    assert config.data.packing is True


def test_yaml_and_dotlist_override(tmp_path):
    path = write(
        tmp_path,
        "data:\n  max_length: 1024\n  sources:\n    - path: a.jsonl\n      weight: 2.0\n      placeholders: {name: Ada}\n",
    )
    config = load_config(path, ["data.max_length=4096", "data.sources.0.weight=0.5"])
    assert config.data.max_length == 4096
    assert config.data.sources[0].weight == 0.5
    assert config.data.sources[0].placeholders == {"name": "Ada"}
    assert type(config.data).__name__ == "DataConfig"  # a dataclass, not a DictConfig


def test_unknown_key_names_the_dotted_key(tmp_path):
    path = write(tmp_path, "data:\n  max_lenght: 1024\n")
    with pytest.raises(ConfigError, match=r"data\.max_lenght"):
        load_config(path)


def test_unknown_key_in_dotlist():
    with pytest.raises(ConfigError, match=r"data\.pack_bufer"):
        load_config(None, ["data.pack_bufer=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        load_config(None, ["data.max_length=lots"])


def test_bad_choice_names_the_key_and_options():
    with pytest.raises(ConfigError, match=r"data\.on_bad_record: 'ignore' is not one of skip, error"):
        load_config(None, ["data.on_bad_record=ignore"])


def test_bad_value_inside_a_list_names_the_index(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      weight: -1\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight"):
        load_config(path)


def test_missing_required_source_path(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - name: nameless\n")
    with pytest.raises(ConfigError, match=r"path"):
        load_config(path)


def test_cross_field_check_custom_template():
    with pytest.raises(ConfigError, match=r"data\.custom_template"):
        load_config(None, ["data.template=custom"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(None, ["data.max_length=512", "seed=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
