"""Defaults from the user's config file: option values per command, as click's `default_map`, so that
the command line wins, then an option's environment variable (LLMCLI_MODEL, LLMCLI_DEVICE...), then
this file, then the built-in default. One table per command, keys named as the long options are:

    # ~/.config/llmcli/config.toml (or $XDG_CONFIG_HOME/llmcli/config.toml, or $LLMCLI_CONFIG)
    [generate]
    model = "~/models/ft2.gguf"
    max-new-tokens = 100

    [chat]
    model = "smollm2"

    [cache.list]
    json = true
"""


import os
import sys
from pathlib import Path
from typing import Any

from llmcli.errors import UsageError

try:  # typer 0.2x vendors its own click, whose exceptions are not click's
    from typer._click.exceptions import BadParameter
except ImportError:  # older typer runs on click itself
    from click.exceptions import BadParameter

HINT = "Fix or remove it (LLMCLI_CONFIG names another file)."


def config_path() -> Path:
    """$LLMCLI_CONFIG, else config.toml in the user's config directory (XDG, as simonw's llm and pip use)."""
    if os.environ.get("LLMCLI_CONFIG"):
        return Path(os.environ["LLMCLI_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "llmcli" / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """The file's TOML as a dict; {} when there is no file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, as the tomli backport
        import tomli as tomllib
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path}: {getattr(exc, 'strerror', None) or exc}", HINT) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"the config file {path} is not valid TOML: {exc}", HINT) from None


def command_defaults(root: Any, path: Path | None = None) -> dict[str, Any]:
    """The config file's values as click's default_map for `root` (the llmcli group), each key checked to
    be an option of its command and each value to be one that option takes."""
    path = path or config_path()
    return defaults_for(root, read_config(path), path, [])


def defaults_for(command: Any, table: dict[str, Any], path: Path, where: list[str]) -> dict[str, Any]:
    if hasattr(command, "commands"):  # a group: its tables are its commands
        defaults = {}
        for name, value in table.items():
            key = ".".join([*where, name])
            if name not in command.commands:
                raise UsageError(f"the config file {path}: [{key}] is not an llmcli command", HINT)
            if not isinstance(value, dict):
                raise UsageError(f"the config file {path}: {key} must be a table ([{key}]) of option values", HINT)
            defaults[name] = defaults_for(command.commands[name], value, path, [*where, name])
        return defaults
    options = options_by_key(command)
    defaults = {}
    for key, value in table.items():
        param = options.get(key.replace("_", "-"))
        if param is None:
            raise UsageError(f"the config file {path}: [{'.'.join(where)}] {key} is not an option of "
                             f"llmcli {' '.join(where)}", HINT)
        defaults[param.name] = checked_value(command, param, value, f"[{'.'.join(where)}] {key}", path)
    return defaults


def options_by_key(command: Any) -> dict[str, Any]:
    """A command's options by their long names without dashes (max-new-tokens), --help left out."""
    options = {}
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help" or param.is_eager:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                options[opt[2:]] = param
    return options


def checked_value(command: Any, param: Any, value: Any, key: str, path: Path) -> Any:
    """`value` as click will take it from the default_map (a "~/" path expanded), checked now so that a
    wrong one names this file rather than an option the user did not type."""
    if param.multiple and not isinstance(value, list):
        value = [value]
    if isinstance(value, list) and not param.multiple:
        raise UsageError(f"the config file {path}: {key} takes one value, not a list", HINT)
    expand = lambda v: os.path.expanduser(v) if isinstance(v, str) and v.startswith("~/") else v  # noqa: E731
    value = [expand(v) for v in value] if isinstance(value, list) else expand(value)
    if getattr(param, "is_flag", False) and not isinstance(value, bool):
        raise UsageError(f"the config file {path}: {key} must be true or false", HINT)
    try:
        param.type_cast_value(command.context_class(command), value)
    except BadParameter as exc:
        raise UsageError(f"the config file {path}: {key} = {value!r}: {exc.message}", HINT) from None
    return value
