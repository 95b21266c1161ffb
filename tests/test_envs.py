"""The conda environments pin the same versions as pyproject.toml."""

import re
import tomllib

import yaml

from conftest import REPO


def _pins(reqs):
    out = {}
    for r in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)\s*", r)
        assert m, f"not pinned exactly: {r!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_env_pins_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins.update(_pins(extra))
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        deps = yaml.safe_load(env.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        for name, version in _pins(pip).items():
            assert pins.get(name) == version, f"{env.name}: {name}=={version}, pyproject has {pins.get(name)}"
