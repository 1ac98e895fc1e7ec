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


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; a float field takes it (the README's --optim.lr 1e-4)."""
    cfg = load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-4\n"), ["--path", "x"])
    assert cfg.inner.lr == 1e-4 and load_config(Outer, None, ["--inner.lr", "2e-3"]).inner.lr == 2e-3


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: run\ninner:\n  lr: 0.01\n  targets: [q, v]\n")
    cfg = load_config(Outer, p, ["--inner.steps", "5", "--inner.mode=b", "--path", "/tmp/x"])
    assert cfg == Outer("run", Inner(0.01, 5, "b", ("q", "v")), "/tmp/x")
    assert to_dict(cfg)["inner"]["targets"] == ["q", "v"]


# the same errors through the training CLI's real schema: tests/bad_inputs/ (config_*, flag_* cases)
@pytest.mark.parametrize("text,overrides,message", [
    ("inner: 3\n", [], r"inner: expected a mapping for Inner"),
    ("inner:\n  targets: q\n", [], r"inner.targets: expected a list"),
])
def test_bad_config(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, write(tmp_path, text), overrides)
