"""Entry-point plugins load lazily and fail alone: a broken one is an error for its name only.

Fake installed packages are real ``*.dist-info`` folders under tmp_path, read by
``importlib.metadata.PathDistribution`` and handed to the registries in place of the
installed ones; their modules live in a folder put on sys.path.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run
from safetensors.torch import save_file

import qlis
import qlis.registry
from qlis.archive.codecs import Codec, codec_registry, register_codec
from qlis.cli.choices import codec_names
from qlis.cli.main import cli
from qlis.errors import ConfigError
from qlis.plan.policy import policy_names, policy_registry
from qlis.quantize.pruners import pruner_registry
from qlis.quantize.quantizers import (
    AffineQuantizer,
    Quantizer,
    quantizer_registry,
    register_quantizer,
)
from qlis.registry import PluginWarning, Registry

GROUP = "qlis.quantizers"
GOOD = ("from qlis.quantize.quantizers import Quantizer\n\nclass Good(Quantizer):\n"
        "    strategy_id = 'good'\n")
_unique = itertools.count()


class Plugins:
    """Fake installed packages (dist-info folders) and the modules their entry points name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.src.mkdir()
        self.dists: list[PathDistribution] = []

    def module(self, source: str) -> str:
        """A new module (a unique name: sys.modules keeps what an earlier test imported)."""
        name = f"qlis_test_plugin_{next(_unique)}"
        (self.src / f"{name}.py").write_text(source)
        return name

    def package(self, name: str, entry_points: dict[str, str], group: str = GROUP) -> None:
        """An installed package ``name`` declaring ``entry_points`` (name -> value)."""
        lines = [f"[{group}]", *(f"{ep} = {value}" for ep, value in entry_points.items())]
        self.raw_package(name, "\n".join(lines) + "\n")

    def raw_package(self, name: str, entry_points_txt: str) -> None:
        info = self.root / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(entry_points_txt)
        self.dists.append(PathDistribution(info))


@pytest.fixture
def plugins(tmp_path, monkeypatch) -> Plugins:
    """Only the fake packages are installed, and every registry reads them afresh."""
    env = Plugins(tmp_path)
    monkeypatch.syspath_prepend(str(env.src))
    monkeypatch.setattr(qlis.registry, "distributions", lambda: list(env.dists))
    for registry in (quantizer_registry, pruner_registry, policy_registry, codec_registry):
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
    return env


@pytest.fixture
def registry() -> Registry[Quantizer]:
    """A quantizer registry of its own, told its base, with one built-in."""
    reg: Registry[Quantizer] = Registry("quantizer", GROUP, base=Quantizer)
    reg.register("builtin", AffineQuantizer)
    return reg


def plugin_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


# (source of the module, the attribute the entry point names, what the error must say)
BROKEN = {
    "import-error": ("raise ImportError('needs libfoo')\n", ":Thing", "ImportError: needs libfoo"),
    "syntax-error": ("def broken(:\n    pass\n", ":Thing", "SyntaxError"),
    "runtime-error": ("raise RuntimeError('no GPU found')\n", ":Thing", "RuntimeError: no GPU"),
    "missing-attribute": ("X = 1\n", ":Thing", "AttributeError"),
    "a-function": ("def Thing():\n    pass\n", ":Thing", "a function, not a class"),
    "a-module": ("X = 1\n", "", "a module, not a class"),
    "wrong-base": ("class Thing:\n    pass\n", ":Thing",
                   "not a subclass of qlis.quantize.quantizers.Quantizer"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_entry_point_fails_alone(plugins, registry, kind):
    source, attribute, reason = BROKEN[kind]
    broken, good = plugins.module(source), plugins.module(GOOD)
    plugins.package("brokenpkg", {"broken": broken + attribute})
    plugins.package("goodpkg", {"good": f"{good}:Good"})

    assert registry.names() == ["broken", "builtin", "good"]
    assert broken not in sys.modules and good not in sys.modules  # names() imports nothing

    assert registry.get("good").__name__ == "Good"
    assert registry.get("builtin") is AffineQuantizer
    with pytest.raises(ConfigError) as err:
        registry.get("broken")
    message = str(err.value)
    assert "'brokenpkg'" in message and f"'broken = {broken}{attribute}'" in message
    assert reason in message and "\n" not in message
    assert registry.get("good").__name__ == "Good"  # still fine after the failure


def test_a_module_that_is_not_there(plugins, registry):
    plugins.package("brokenpkg", {"broken": "qlis_test_no_such_module:Thing"})
    with pytest.raises(ConfigError, match="ModuleNotFoundError.*qlis_test_no_such_module"):
        registry.get("broken")


def test_a_broken_entry_point_is_imported_once_and_fails_the_same_each_time(
        plugins, registry, tmp_path):
    count = tmp_path / "imports"
    broken = plugins.module(f"open({str(count)!r}, 'a').write('x')\nraise RuntimeError('boom')\n")
    plugins.package("brokenpkg", {"broken": f"{broken}:Thing"})
    messages = []
    for _ in range(3):
        with pytest.raises(ConfigError) as err:
            registry.get("broken")
        messages.append(str(err.value))
    assert count.read_text() == "x"
    assert len(set(messages)) == 1


def test_only_the_asked_for_entry_point_is_imported(plugins, registry):
    first, second = plugins.module(GOOD), plugins.module(GOOD)
    plugins.package("pkg", {"first": f"{first}:Good", "second": f"{second}:Good"})
    registry.get("first")
    assert first in sys.modules and second not in sys.modules


def test_keyboard_interrupt_is_not_swallowed(plugins, registry):
    plugins.package("pkg", {"stop": f"{plugins.module('raise KeyboardInterrupt')}:Thing"})
    assert "stop" in registry.names()
    with pytest.raises(KeyboardInterrupt):
        registry.get("stop")


def test_a_built_in_name_wins_and_says_so_once(plugins, registry):
    plugins.package("shadowpkg", {"builtin": f"{plugins.module(GOOD)}:Good"})
    assert registry.names() == ["builtin"]
    messages = plugin_warnings(lambda: [registry.get("builtin") for _ in range(3)])
    assert len(messages) == 1
    assert "'builtin = " in messages[0] and "'shadowpkg'" in messages[0]
    assert registry.get("builtin") is AffineQuantizer


def test_of_two_packages_declaring_a_name_the_first_by_name_wins_and_a_warning_names_both(
        plugins, registry):
    zeta = plugins.module(GOOD.replace("Good", "Zeta"))
    alpha = plugins.module(GOOD.replace("Good", "Alpha"))
    plugins.package("zeta-plugins", {"dup": f"{zeta}:Zeta"})  # first on the path
    plugins.package("Alpha-Plugins", {"dup": f"{alpha}:Alpha"})
    assert registry.names() == ["builtin", "dup"]
    got = []
    messages = plugin_warnings(lambda: got.extend(registry.get("dup") for _ in range(3)))
    assert {cls.__name__ for cls in got} == {"Alpha"}
    assert zeta not in sys.modules
    assert len(messages) == 1
    assert "'Alpha-Plugins'" in messages[0] and "'zeta-plugins'" in messages[0]
    assert messages[0].index("Alpha-Plugins") < messages[0].index("ignoring")


def test_unreadable_metadata_is_one_warning_and_the_other_packages_still_count(
        plugins, registry):
    plugins.raw_package("garbled", f"[{GROUP}]\nno-equals-sign\n")
    plugins.package("goodpkg", {"good": f"{plugins.module(GOOD)}:Good"})
    messages = plugin_warnings(lambda: [registry.names() for _ in range(3)])
    assert len(messages) == 1 and "'garbled'" in messages[0]
    assert registry.names() == ["builtin", "good"]
    assert registry.get("good").__name__ == "Good"


def test_without_a_package_declaring_the_group_no_package_name_is_read(plugins, registry,
                                                                        monkeypatch):
    plugins.package("other", {"thing": "somewhere:Thing"}, group="another.group")
    read, name = [], PathDistribution.name
    counted = property(lambda dist: read.append(dist) or name.fget(dist))
    monkeypatch.setattr(PathDistribution, "name", counted)
    assert registry.names() == ["builtin"] and read == []
    plugins.package("goodpkg", {"good": f"{plugins.module(GOOD)}:Good"})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert registry.names() == ["builtin", "good"] and len(read) == 2  # now: every name


def test_an_unknown_name_lists_the_plugins_without_importing_them(plugins, registry):
    broken = plugins.module("raise RuntimeError('boom')")
    plugins.package("brokenpkg", {"broken": f"{broken}:Thing"})
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'; known: broken, builtin"):
        registry.get("nope")
    assert broken not in sys.modules


@pytest.fixture
def everything_broken(plugins):
    """A broken entry point in every group."""
    raising = plugins.module("raise ImportError('needs libfoo')")
    for group in ("qlis.quantizers", "qlis.pruners", "qlis.policies", "qlis.codecs"):
        plugins.package(f"broken-{group.split('.')[1]}", {"broken": f"{raising}:Thing"}, group)
    return plugins


def test_the_cli_choices_and_help_work_with_broken_plugins(everything_broken):
    everything_broken.raw_package("garbled", "[qlis.policies]\nno-equals-sign\n")
    # What qlis/cli/model_commands.py computes at import time for its --policy and --codec choices.
    assert "broken" in policy_names() and "rd" in policy_names()
    assert "broken" in codec_names() and "auto" in codec_names()
    for args in (["--help"], ["pack", "--help"]):
        result = run(cli, *args)
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.stdout


def test_a_command_asking_for_a_broken_plugin_is_one_error_line(everything_broken, tmp_path):
    model = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(64, 32)}, str(model))
    line = one_line_error(cli, "qlis: error:", "pack", model, "-o", tmp_path / "out.qlis",
                          "--policy", "quant", "--quantizer", '{"id": "broken"}')
    assert "'broken-quantizers'" in line and "ImportError: needs libfoo" in line
    assert not (tmp_path / "out.qlis").exists()


def test_the_entry_point_groups_are_the_documented_ones():
    """Third-party packages declare plugins under these names (README, docs/codecs.md): they
    are an interface, whatever module the registries live in."""
    groups = {r.kind: r.group for r in (quantizer_registry, pruner_registry, policy_registry,
                                        codec_registry)}
    assert groups == {"quantizer": "qlis.quantizers", "pruner": "qlis.pruners",
                      "policy": "qlis.policies", "codec": "qlis.codecs"}


# A plugin quantizer with a grid (one float32 scale, 4 codes), and what another plugin under
# the same id may do instead when it reads the archive back.
GRID_PLUGIN = """
import numpy as np
import torch
from qlis.quantize.grid import AffineGrid, matrix_shape
from qlis.quantize.quantizers import Quantizer, QuantizedTensor

class Mine(Quantizer):
    strategy_id = "mine"

    def quantize(self, weight):
        params = {{"scale": np.array([float(weight.abs().max()) / 2], np.float32)}}
        codes = self.grid(tuple(weight.shape), 4, params).encode(
            weight.detach().float().reshape(matrix_shape(weight.shape)))
        return QuantizedTensor(codes.to(torch.uint8).reshape(weight.shape).numpy(), 4,
                               self.get_config(), params, weight.dtype)

    def grid(self, shape, n_levels, params):
        {grid}
        rows, cols = matrix_shape(shape)
        scale = torch.from_numpy(np.asarray(params["scale"], np.float32)).reshape(1, 1)
        return AffineGrid((max(rows, 1), max(cols, 1)), scale, torch.full((1, 1), 2.0), top=3)

    def dequantize(self, q):
        {dequantize}
        return super().dequantize(q)

    {more}
"""
OTHER_PLUGINS = {  # (grid, dequantize, more): what each reader's plugin does wrong
    "init raises": ("", "", "def __init__(self):\n        raise RuntimeError('needs a GPU')"),
    "grid raises": ("raise ZeroDivisionError('its own bug')", "", ""),
    "grid not a Grid": ("return 'a grid'", "", ""),
    "level_range fails": ("", "", "def level_range(self):\n        return None"),
    "dequantize raises": ("", "raise AttributeError('its own bug')", ""),
}


@pytest.mark.parametrize("other", OTHER_PLUGINS)
def test_an_archive_read_by_another_plugin_under_its_id_is_one_error_line(plugins, tmp_path,
                                                                         other):
    """An archive written with one plugin and read where another package declares the same
    id: what that plugin raises or returns wrong is one error line naming it, never a
    traceback, whichever reader meets it."""
    writer = plugins.module(GRID_PLUGIN.format(grid="", dequantize="", more=""))
    model = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(8, 16)}, str(model))
    plugins.package("writer", {"mine": f"{writer}:Mine"})
    archive = tmp_path / "m.qlis"
    result = run(cli, "pack", model, "-o", archive, "--policy", "quant",
                 "--quantizer", '{"id": "mine"}')
    assert result.exit_code == 0, result.output

    reader = plugins.module(GRID_PLUGIN.format(grid=OTHER_PLUGINS[other][0],
                                               dequantize=OTHER_PLUGINS[other][1],
                                               more=OTHER_PLUGINS[other][2]))
    plugins.dists.clear()
    plugins.package("reader", {"mine": f"{reader}:Mine"})
    quantizer_registry._entry_points_loaded = False
    commands = (["unpack", archive, "-o", tmp_path / "out.safetensors"],
                ["info", "--verify", archive])
    for args in commands if other != "dequantize raises" else ():  # they decode on the grid
        line = one_line_error(cli, "qlis: error:", *args)
        assert "'mine'" in line, line
    with pytest.raises(qlis.QlisError, match="'mine'"):
        qlis.load(archive)


def test_a_plugin_cannot_take_a_built_in_id_nor_an_empty_one(monkeypatch):
    """Archives name what wrote them by id: a class registered under qlis' own id would read
    every archive qlis wrote (a registered 'affine' that doubles its values loaded them
    doubled, silently), and one without an id was registered as ''."""
    for registry in (quantizer_registry, codec_registry):
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))

    class Doubled(AffineQuantizer):
        def dequantize(self, q):
            return super().dequantize(q) * 2

    class MyAns(Codec):
        codec_id = "ans"

    class NoId(Quantizer):
        pass

    with pytest.raises(ConfigError, match="'affine' is qlis' own"):
        register_quantizer(Doubled)
    with pytest.raises(ConfigError, match="'ans' is qlis' own"):
        register_codec(MyAns)
    with pytest.raises(ConfigError, match="non-empty string id"):
        register_quantizer(NoId)
    assert quantizer_registry.get("affine") is AffineQuantizer
    assert "" not in quantizer_registry.names()
    register_quantizer(AffineQuantizer)  # registering the same class again is harmless

    class Mine(Quantizer):
        strategy_id = "test-mine"

    class Mine2(Quantizer):
        strategy_id = "test-mine"

    register_quantizer(Mine)
    assert plugin_warnings(lambda: register_quantizer(Mine2)) == [
        f"quantizer 'test-mine': {Mine2.__module__}.{Mine2.__qualname__} replaces "
        f"{Mine.__module__}.{Mine.__qualname__}"]
