"""--config FILE: train.py's settings from a YAML mapping whose keys are the flag names, each checked for its type.

    python train.py --config configs/llama3-8b-24gb.yaml --dataset my_data.jsonl   # a flag overrides the file

train.parse_config makes the file's values the parser's defaults, so every flag on the command line still wins, and
the run folder's train_config.json holds the settings as resolved. Keys take underscores or dashes, as the flags do.
An unknown key is refused with the nearest flag name, a value of another type with the type its flag takes, and a
file with no settings at all (empty, or only comments) as such.
"""
import dataclasses
import difflib
import re
from pathlib import Path

import yaml

EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
YAML_TYPES = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "a list", dict: "a mapping"}


class _GivenTwice(yaml.YAMLError):
    """A key written twice in one mapping: YAML wants keys unique, and PyYAML would keep the last one silently."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading scalars as YAML 1.2's core schema does, and refusing a key given twice.

    PyYAML resolves YAML 1.1, where 0100 is octal (64), 1:30 is sexagesimal (90), 1_024 is 1024, yes is true,
    2026-12-01 a date and 2e-4 a string. Here decimal integers, floats (2e-4 included), true/false and null are
    resolved; anything else is a string, which a flag of another type refuses.
    """
    yaml_implicit_resolvers = {}

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a list or mapping as a key: SafeLoader refuses it
            line = key.start_mark.line + 1
            if key.value in lines:
                at = f"lines {lines[key.value]} and {line}" if lines[key.value] != line else f"line {line}"
                raise _GivenTwice(f"{key.value} is given twice ({at}); keep one")
            lines[key.value] = line
        return super().construct_mapping(node, deep)


for _tag, _pattern, _first in [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+", list("-+0123456789")),  # before float, which would match it too
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+.0123456789")),
]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"(?:{_pattern})\Z"), _first)
# SafeLoader's own int constructor reads a leading 0 as octal; its float, null and bool ones read 1.2's forms right.
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def read(path: Path, fields: tuple[dataclasses.Field, ...]) -> dict:
    """The file's settings by field name, each of its field's type; a ValueError names the file and the key."""
    try:
        with Path(path).open() as f:  # a stream, so that YAML's errors name the file, with the line and column
            loaded = yaml.load(f, _Loader)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except _GivenTwice as e:
        raise ValueError(f"--config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if loaded is None or loaded == {}:  # empty, only comments, or {}: the run would be the defaults, unasked
        raise ValueError(f"--config {path} holds no settings: write the flags to set in it, one per line (e.g. "
                         "'lr: 2.0e-4'), or leave --config out")
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path} must be a mapping of flag names to values (e.g. 'lr: 2.0e-4'), not "
                         f"{_described(loaded)}")
    by_name = {f.name: f for f in fields if f.name != "config"}
    settings = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name == "config":
            raise ValueError(f"--config {path}: '{key}: {value}' names another config file, and config files do not "
                             "nest: copy its keys into this one")
        if name not in by_name:
            near = difflib.get_close_matches(name, list(by_name), n=1)
            raise ValueError(f"--config {path}: {key!r} is not a flag of train.py"
                             + (f"; did you mean {near[0]}?" if near else ""))
        if name in settings:
            raise ValueError(f"--config {path}: {name} is given twice (with underscores and with dashes)")
        settings[name] = _typed(path, key, value, by_name[name])
    return settings


def _typed(path: Path, key: str, value, f: dataclasses.Field):
    """`value` as its flag's type, or a ValueError naming the key and the type it takes."""
    if f.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # lr: 1 is a number
    if not isinstance(value, f.type) or (f.type is int and isinstance(value, bool)):  # YAML's true is no integer
        raise ValueError(f"--config {path}: {key} must be {EXPECTED[f.type]}, got {value!r} ({_described(value)})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"--config {path}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _described(value) -> str:
    return YAML_TYPES.get(type(value), type(value).__name__)
