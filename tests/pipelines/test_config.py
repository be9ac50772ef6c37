"""The typed config library: YAML + key=value overrides into nested dataclasses, with every key
and value type checked, and a one-line error naming the key otherwise."""

from dataclasses import dataclass, field

import pytest

from pipelines import config as config_lib


@dataclass
class Inner:
    paths: list[str] = field(default_factory=list)   # a list field
    weight: float = 1.0


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.95)
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    mode: bool | str = "auto"
    extra: dict = field(default_factory=dict)


def test_values_are_checked_and_converted_as_the_command_line_needs():
    cfg = config_lib.load(Outer, None, ["inner.paths=/data/a", "inner.weight=2e-3", "betas=[0.8, 0.9]", "name=2024",
                                        "maybe={paths: [b]}", "mode=true", "extra={a: 1}"])
    assert cfg.inner.paths == ["/data/a"] and cfg.inner.weight == 2e-3 and cfg.betas == (0.8, 0.9)
    assert cfg.name == "2024" and cfg.maybe == Inner(paths=["b"]) and cfg.mode is True and cfg.extra == {"a": 1}
    assert config_lib.load(Outer, None, ["mode=auto", "steps=3", "inner.weight=2"]).mode == "auto"
    assert config_lib.from_dict(Outer, config_lib.to_dict(cfg)) == cfg          # a round trip through plain dicts


@pytest.mark.parametrize("override, message", [
    ("inner=/x", "inner must be a section with keys paths, weight, got '/x'"),
    ("steps=1.5", "steps must be an integer, got 1.5"),
    ("steps=true", "steps must be an integer, got True"),
    ("inner.weight=heavy", "inner.weight must be a number, got 'heavy'"),
    ("betas=[1, 2, 3]", "betas must be a list of 2 values, got [1, 2, 3]"),
    ("inner.paths={a: 1}", "inner.paths must be a list, got {'a': 1}"),
    ("mode=[1]", "mode must be true/false or a string, got [1]"),
    ("inner.wieght=1", "unknown key 'wieght' in inner; did you mean 'weight'?"),
    ("stepz=1", "unknown key 'stepz'; did you mean 'steps'?"),
    ("steps", "override 'steps' must look like key=value"),
    ("steps=[1", "steps: '[1' is not a YAML value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        config_lib.load(Outer, None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_files_and_override_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {paths: [a], weight: 3}\nsteps: 4\n")
    cfg = config_lib.load(Outer, path, ["steps=5"])
    assert (cfg.steps, cfg.inner.paths, cfg.inner.weight) == (5, ["a"], 3)
    with pytest.raises(ValueError, match=f"inner.weight must be a number, got 'x' \\(config file {path}\\)"):
        config_lib.load(Outer, path, ["inner.weight=x"])
    with pytest.raises(ValueError, match="config file .*none.yaml does not exist"):
        config_lib.load(Outer, tmp_path / "none.yaml")
    # A section of overrides (as a YAML file holds them): dotted keys and mappings under a section
    # set single fields; a dict-typed field is set whole.
    cfg = config_lib.override(cfg, {"inner.weight": 7, "extra": {"b": 2}}, "demo")
    assert (cfg.inner.paths, cfg.inner.weight, cfg.extra) == (["a"], 7, {"b": 2})
    cfg = config_lib.override(cfg, {"inner": {"paths": ["c"]}, "maybe": {"weight": 4}, "extra": {"c": 3}})
    assert (cfg.inner.paths, cfg.inner.weight, cfg.maybe, cfg.extra) == (["c"], 7, Inner(weight=4), {"c": 3})
    with pytest.raises(ValueError, match="unknown key 'wait' in demo.inner"):
        config_lib.override(cfg, {"inner.wait": 1}, "demo")
