"""The config schema: YAML + dotlist loading, and errors that name the dotted key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ift_dist.config import (
    Config,
    ConfigError,
    DType,
    ModelConfig,
    OnSaveError,
    check_paths,
    load_config,
    save_config,
    to_dict,
)
from ift_dist.data.contracts import DataFileError
from ift_dist.data.sources import open_source


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


def test_choices_are_plain_strings_in_yaml_dicts_and_comparisons(tmp_path):
    config = load_config(None, ["model.dtype=bfloat16", "checkpoint.on_save_error=continue"])
    assert config.model.dtype is DType.bfloat16 and config.model.dtype == "bfloat16"
    assert config.checkpoint.on_save_error == OnSaveError["continue"] == "continue"
    assert {"bfloat16": 1}[config.model.dtype] == 1 and f"{config.model.dtype}" == "bfloat16"
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "bfloat16" and saved["checkpoint"]["on_save_error"] == "continue"
    plain = to_dict(config)
    assert type(plain["model"]["dtype"]) is str and plain == saved
    # A section built in code with a plain string is converted by validate; a bad one names the key.
    model = ModelConfig(dtype="float16")
    model.validate("model")
    assert model.dtype is DType.float16
    with pytest.raises(ConfigError, match=r"^model\.attention: 'fast' is not one of auto, flash_attn"):
        ModelConfig(attention="fast").validate("model")


def test_bad_choice_inside_a_list_names_the_index(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      format: csv\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.format: 'csv' is not one of auto, alpaca"):
        load_config(path)


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


def test_unknown_yaml_key_suggests_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "data:\n  max_lenght: 1024\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"data.max_lenght: unknown key; did you mean data.max_length? (in {path})"
    with pytest.raises(ConfigError, match=r"^dat: unknown key; did you mean data\?"):
        load_config(write(tmp_path, "dat:\n  max_length: 1024\n"))


def test_unknown_key_inside_a_list_element_names_its_index(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      wieght: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"^data\.sources\[1\]\.wieght: unknown key; did you mean data\.sources\[1\]\.weight\?",
    ):
        load_config(path)
    # Keys inside a mapping field are the user's own.
    ok = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n      placeholders: {nmae: Ada}\n")
    assert load_config(ok).data.sources[0].placeholders == {"nmae": "Ada"}


def test_unknown_override_suggests_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.max_lenght=1"])
    assert str(error.value) == (
        "data.max_lenght: unknown key; did you mean data.max_length? "
        "(from the command line override 'data.max_lenght=1')"
    )
    path = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n")
    for key in ("data.sources[0].wieght", "data.sources.0.wieght"):
        with pytest.raises(
            ConfigError,
            match=r"^data\.sources\[0\]\.wieght: unknown key; did you mean data\.sources\[0\]\.weight\?",
        ):
            load_config(path, [f"{key}=2"])
    with pytest.raises(
        ConfigError, match=r"^tracking\.wandb\.mod: unknown key; did you mean tracking\.wandb\.mode\?"
    ):
        load_config(None, ["tracking.wandb.mod=online"])


def test_unknown_key_without_a_close_match_lists_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"^export\.zzz: unknown key; the keys of export are at_end, dir, "):
        load_config(None, ["export.zzz=1"])


def test_a_missing_relative_path_says_what_it_was_resolved_against(tmp_path, monkeypatch):
    """Relative paths resolve against the working directory, not the config file's folder: the error says both."""
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "x.json").write_text(
        "[]"
    )  # beside the config: not where it is looked for
    config_file = tmp_path / "configs" / "run.yaml"
    config_file.write_text("model:\n  name_or_path: org/model\ndata:\n  sources:\n    - path: data/x.json\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file)
    rule = f"relative paths resolve against the working directory {Path.cwd()}"
    with pytest.raises(ConfigError) as error:
        check_paths(config, config_file)
    assert str(error.value) == (
        f"data.sources[0].path: data/x.json does not exist ({rule}; the config file is {config_file.resolve()})"
    )
    with pytest.raises(DataFileError, match=re.escape(f"data/x.json: no such file or directory ({rule})")):
        open_source(config.data.sources[0])
    config.data.sources[0].path = "configs/data/x.json"
    check_paths(config, config_file)  # exists; org/model may be a hub id: left to from_pretrained


def test_check_paths_names_each_missing_path(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    base = ["model.name_or_path=org/model", f"data.sources=[{{path: {tmp_path}/x.jsonl}}]"]

    def refused(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            check_paths(load_config(None, [*base, *overrides]), None)
        return str(error.value)

    check_paths(load_config(None, base))
    assert refused("data.tokenizer=../no/tokenizer").startswith(
        "data.tokenizer: ../no/tokenizer does not exist and is not a Hugging Face hub id (relative paths resolve"
    )
    assert refused("model.name_or_path=./no-model").startswith(
        "model.name_or_path: ./no-model does not exist"
    )
    assert refused(f"model.name_or_path={tmp_path}/no-model") == (
        f"model.name_or_path: {tmp_path}/no-model does not exist and is not a Hugging Face hub id"
    )  # absolute: nothing to resolve
    assert refused(f"model.name_or_path={tmp_path}", "model.gguf_file=m.gguf").startswith(
        "model.gguf_file: m.gguf"
    )
    assert refused("model.name_or_path=").startswith("model.name_or_path: not set")
    assert refused(f"data.eval_sources=[{{path: {tmp_path}/*.parquet}}]").startswith(
        f"data.eval_sources[0].path: {tmp_path}/*.parquet matches no file"
    )
    assert refused("data.sources=[]").startswith("data.sources: empty")
    assert refused("train.zero_config=no.json").startswith("train.zero_config: no.json does not exist")
