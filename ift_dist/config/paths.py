"""The local paths a run config names, checked against this machine before any rank starts, so that a typo costs a
second, not a rendezvous (a relative path's error says what it was resolved against). Torch-free: the launcher runs it
on login nodes.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from ift_dist.config.checks import ConfigError
from ift_dist.config.schema import Config

# A Hugging Face repo id: "name" or "namespace/name" of letters, digits, "-", "_", "." (from_pretrained's own test
# is "not a local directory"; a missing path of this shape may be a hub id and is left to it).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def relative_path_note(path: str | Path, config_file: str | Path | None = None) -> str:
    """For an error about a path: what a relative one was resolved against (always the working directory, never the
    config file's folder); "" for an absolute path."""
    if Path(path).expanduser().is_absolute():
        return ""
    where = f"; the config file is {Path(config_file).resolve()}" if config_file is not None else ""
    return f" (relative paths resolve against the working directory {Path.cwd()}{where})"


def _missing(
    key: str, path: str, config_file: str | Path | None, what: str = "does not exist"
) -> ConfigError:
    return ConfigError(f"{key}: {path} {what}{relative_path_note(path, config_file)}")


def _check_exists(key: str, path: str, config_file: str | Path | None) -> None:
    """A file or directory, or a glob that matches something."""
    expanded = str(Path(path).expanduser())
    if any(character in path for character in "*?["):
        if not glob.glob(expanded, recursive=True):
            raise _missing(key, path, config_file, "matches no file")
    elif not Path(expanded).exists():
        raise _missing(key, path, config_file)


def _check_model_path(key: str, path: str, config_file: str | Path | None) -> Path | None:
    """A local directory (returned) or a hub id (None); a missing path that cannot be a hub id is an error."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if _HUB_ID.fullmatch(path) and ".." not in path:
        return None
    raise _missing(key, path, config_file, "does not exist and is not a Hugging Face hub id")


def check_paths(config: Config, config_file: str | Path | None = None) -> None:
    """The files and directories a training run reads must exist here: the model (when local), the tokenizer, the
    data, the DeepSpeed JSON, a resume path. ConfigError names the first one missing; nothing is opened or read."""
    model = config.model
    if not model.name_or_path:
        raise ConfigError(
            "model.name_or_path: not set; give a local model directory or a Hugging Face hub id"
        )
    local = _check_model_path("model.name_or_path", model.name_or_path, config_file)
    if local is not None and model.gguf_file and not (local / model.gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: {model.gguf_file} is not in model.name_or_path ({local})")
    data = config.data
    if data.tokenizer:
        _check_model_path("data.tokenizer", data.tokenizer, config_file)
    if data.prepared:
        _check_exists("data.prepared", data.prepared, config_file)
    elif not data.sources:
        raise ConfigError("data.sources: empty; list at least one data set (or set data.prepared)")
    # With data.prepared, training reads the prepared shards, not data.sources.
    for name in ("eval_sources",) if data.prepared else ("sources", "eval_sources"):
        for index, source in enumerate(getattr(data, name)):
            _check_exists(f"data.{name}[{index}].path", source.path, config_file)
    if config.train.zero_config:
        _check_exists("train.zero_config", config.train.zero_config, config_file)
    if config.train.sample_prompts_file:
        _check_exists("train.sample_prompts_file", config.train.sample_prompts_file, config_file)
    if config.checkpoint.resume not in ("auto", "never"):
        _check_exists("checkpoint.resume", config.checkpoint.resume, config_file)
