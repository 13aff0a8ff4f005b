"""Packaged scenarios: named YAML files in this folder. A run is its resolved config + seed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from agorasim.config import load_yaml
from agorasim.errors import UserInputError


def scenario_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_scenario(name_or_path: str) -> dict:
    """The scenario dict for a packaged name or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and name_or_path not in scenario_names():
        if not path.is_file():
            raise UserInputError(f"--scenario {name_or_path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"--scenario {name_or_path}: not a text (UTF-8) YAML file") from None
        except OSError as error:
            raise UserInputError(f"--scenario {name_or_path}: cannot read it ({error.strerror})") from None
    elif name_or_path in scenario_names():
        text = resources.files(__name__).joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise UserInputError(
            f"unknown scenario '{name_or_path}': choose one of {', '.join(scenario_names())} or a .yaml path")
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as error:
        raise UserInputError(f"scenario '{name_or_path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"scenario '{name_or_path}' must be a mapping of sections")
    data.setdefault("scenario", path.stem if path.suffix else name_or_path)
    return data


def describe_scenarios() -> list[tuple[str, str]]:
    return [(name, load_scenario(name).get("description", "")) for name in scenario_names()]
