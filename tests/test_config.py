"""Config loading: YAML + dotted overrides, validated at load with messages naming the key."""

import dataclasses
from typing import Literal

import pytest

from mtp_jax.config import ConfigError, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    targets: tuple[str, ...] = ("q", "k")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = Inner()
    path: str | None = None


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: run\ninner:\n  lr: 0.01\n  targets: [q, v]\n")
    cfg = load_config(Outer, p, ["--inner.steps", "5", "--inner.mode=b", "--path", "/tmp/x"])
    assert cfg == Outer("run", Inner(0.01, 5, "b", ("q", "v")), "/tmp/x")
    assert to_dict(cfg)["inner"]["targets"] == ["q", "v"]


@pytest.mark.parametrize("text,overrides,message", [
    ("inner:\n  lrr: 0.1\n", [], r"c.yaml: inner.lrr: unknown key \(did you mean 'lr'\?\)"),
    ("inner:\n  steps: many\n", [], r"c.yaml: inner.steps: expected an integer, got 'many'"),
    ("", ["--inner.mode", "c"], r"inner.mode: expected one of \['a', 'b'\], got 'c'"),
    ("inner: 3\n", [], r"inner: expected a mapping for Inner"),
    ("inner:\n  targets: q\n", [], r"inner.targets: expected a list"),
    ("name: [unclosed\n", [], r"c.yaml: line \d+ invalid YAML"),
    ("", ["--inner.steps"], r"missing value"),
])
def test_bad_config(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, write(tmp_path, text), overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
