"""--config FILE: train.py's settings from a YAML mapping whose keys are the flag names, each checked for its type.

    python train.py --config configs/llama3-8b-24gb.yaml --dataset my_data.jsonl   # a flag overrides the file

train.parse_config makes the file's values the parser's defaults, so every flag on the command line still wins, and
the run folder's train_config.json holds the settings as resolved. Keys take underscores or dashes, as the flags do.
An unknown key is refused with the nearest flag name, a value of another type with the type its flag takes.
"""
import dataclasses
import difflib
import re
from pathlib import Path

import yaml

# PyYAML reads YAML 1.1, where 2e-4 is a string (it wants 2.0e-4): a float flag takes that spelling as the number.
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
YAML_TYPES = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "a list", dict: "a mapping"}


def read(path: Path, fields: tuple[dataclasses.Field, ...]) -> dict:
    """The file's settings by field name, each of its field's type; a ValueError names the file and the key."""
    try:
        with Path(path).open() as f:  # a stream, so that YAML's errors name the file, with the line and column
            loaded = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if loaded is None:  # empty, or only comments
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path} must be a mapping of flag names to values (e.g. 'lr: 2.0e-4'), not "
                         f"{_described(loaded)}")
    by_name = {f.name: f for f in fields if f.name != "config"}  # a file naming another file would be a chain
    settings = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
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
    if f.type is float and isinstance(value, str) and EXPONENT.fullmatch(value):
        value = float(value)
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
