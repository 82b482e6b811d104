"""Every registered configurable thing (policies, quantizers, pruners, codecs) round-trips
through its config and refuses any bad value with a ConfigError, never another exception."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlis
from qlis.archive.codecs import codec_registry, get_codec
from qlis.errors import QlisError
from qlis.plan.policy import make_policy, policy_registry
from qlis.quantize.pruners import get_pruner, pruner_registry
from qlis.quantize.quantizers import get_quantizer, quantizer_registry

hostile = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
        st.sampled_from([0, 1, -1, 2, 8, 9, 1 << 26, 1e300, -0.0, 0.5, "tensor", "channel",
                         "row", "affine", "rd", "ans"]),
    ),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)

REGISTRIES = {
    "quantizer": (quantizer_registry, get_quantizer),
    "pruner": (pruner_registry, get_pruner),
    "codec": (codec_registry, get_codec),
}


def _default_config(kind: str, name: str) -> dict:
    _, build = REGISTRIES[kind]
    try:
        return build({"id": name}).get_config()
    except QlisError:  # a strategy without defaults for every parameter (uniform: a step)
        return build({"id": name, **_REQUIRED.get(name, {})}).get_config()


_REQUIRED = {"uniform": {"step": 0.1}}


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, (r, _) in REGISTRIES.items()
                                            for n in r.names()])
def test_strategy_configs_round_trip(kind, name):
    registry, build = REGISTRIES[kind]
    config = _default_config(kind, name)
    again = build(config)
    assert again.get_config() == config


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, (r, _) in REGISTRIES.items()
                                            for n in r.names()])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_strategy_configs_refuse_bad_values_with_a_config_error(kind, name, data):
    registry, build = REGISTRIES[kind]
    config = _default_config(kind, name)
    keys = sorted(config) + ["unknown"]
    key = data.draw(st.sampled_from(keys))
    config[key] = data.draw(hostile)
    try:
        built = build(config)
    except QlisError:
        return
    assert build(built.get_config()).get_config() == built.get_config()


def _tiny() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(16, 32, generator=gen), "fc.bias": torch.randn(16)}


@pytest.mark.parametrize("name", policy_registry.names())
def test_policy_configs_round_trip(name):
    policy = make_policy(name)
    config = policy.get_config()
    options = {k: v for k, v in config.items() if k != "id"}
    assert make_policy(name, **options) == policy


@pytest.mark.parametrize("name", policy_registry.names())
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_policy_options_refuse_bad_values_with_a_config_error(name, data):
    config = make_policy(name).get_config()
    keys = sorted(k for k in config if k != "id") + ["unknown", "k", "bits", "target_ratio"]
    key = data.draw(st.sampled_from(keys))
    try:
        policy = make_policy(name, **{key: data.draw(hostile)})
        qlis.compress(_tiny(), policy)
    except QlisError:
        return


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_plan_entries_refuse_bad_values_with_a_config_error(data):
    """A hand-written plan (compress(plan=...), --plan FILE): every entry is checked when the
    plan is made, whatever it holds."""
    kind = data.draw(st.sampled_from(["pruner", "quantizer"]))
    registry = pruner_registry if kind == "pruner" else quantizer_registry
    config = _default_config(kind, data.draw(st.sampled_from(registry.names())))
    config[data.draw(st.sampled_from(sorted(config) + ["unknown"]))] = data.draw(hostile)
    entry = data.draw(st.sampled_from([{kind: config}, config, {kind: config, "x": 1}]))
    try:
        qlis.compress(_tiny(), plan={"fc.weight": entry})
    except QlisError:
        return


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_compress_and_inspect_options_refuse_bad_values_with_a_config_error(data):
    """compress's own options (beta, eps, select, error_feedback, bias_correction,
    rounding_sweeps, jobs) and inspect's, whatever they hold."""
    key = data.draw(st.sampled_from(["beta", "eps", "select", "error_feedback",
                                     "bias_correction", "rounding_sweeps", "jobs"]))
    value = data.draw(hostile)
    calib = [torch.randn(2, 32)] if data.draw(st.booleans()) else None
    with contextlib.suppress(QlisError):
        qlis.compress(torch.nn.Linear(32, 16), **{key: value}, calib=calib)
    if key in ("beta", "eps", "select", "jobs"):
        with contextlib.suppress(QlisError):
            qlis.inspect(torch.nn.Linear(32, 16), **{key: value})


@pytest.mark.parametrize("call", [
    lambda r, p: qlis.save(r, p, metadata=[1]),
    lambda r, p: qlis.save(r, 5),
    lambda r, p: qlis.save(r, p, overwrite="no"),
    lambda r, p: qlis.save(r, p, codec={"id": "ans"}),
    lambda r, p: qlis.save(r, p, source_bytes="x"),
    lambda r, p: qlis.load(p, 5),
    lambda r, p: qlis.load(p, max_decoded_bytes="x"),
    lambda r, p: qlis.open(5),
    lambda r, p: qlis.open(b"m.qlis"),
    lambda r, p: qlis.pack(_tiny(), p, resume="x"),
    lambda r, p: qlis.pack(_tiny(), p, jobs=-1),
])
def test_the_public_functions_refuse_arguments_of_the_wrong_kind(tmp_path, call):
    result = qlis.compress(_tiny())
    path = qlis.save(result, tmp_path / "m.qlis")
    before = path.read_bytes()
    with pytest.raises(QlisError):
        call(result, path)
    assert path.read_bytes() == before


def test_numpy_scalars_are_numbers_and_messages_stay_short():
    assert qlis.AffineQuantizer(bits=np.int64(4)).get_config()["bits"] == 4
    assert type(qlis.AffineQuantizer(bits=np.int64(4)).bits) is int
    assert make_policy("rd", target_ratio=np.float32(8)).target_ratio == 8.0
    deep: list = []
    inner = deep
    for _ in range(100_000):  # a repr of this would recurse past Python's limit
        inner.append([])
        inner = inner[0]
    with pytest.raises(QlisError) as refused:
        qlis.AffineQuantizer(bits=deep)
    assert len(str(refused.value)) < 200


def test_messages_say_what_an_option_takes():
    with pytest.raises(QlisError, match=r"policy 'rd': seed must be an integer in "
                                        r"\[0, 2147483647\], got 1\.5"):
        make_policy("rd", seed=1.5)
    with pytest.raises(QlisError, match="granularities must be a non-empty list of items each "
                                        "one of 'tensor', 'channel', got"):
        make_policy("rd", granularities=[])
    with pytest.raises(QlisError, match=r"bits_levels must be a non-empty list of integers in "
                                        r"\[1, 8\], each may be null, got \[9\]"):
        make_policy("levels", bits_levels=[9])
