"""CLIP and DINO backbones through `transformers`, loaded offline (a folder or the HF cache).

Pretrained weights cannot be downloaded where qlis-iqa often runs, so nothing here touches the
network: a backbone comes from a folder written by `save_pretrained` / `hf download`, or from a
Hugging Face cache, and a miss says exactly where it looked and what to run on a connected
machine. Random-initialised backbones (tests, benchmarks without weights) carry the config flag
`qlis_random_init` so that every result computed from them can be labelled as such.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from qlis.archive.atomic import new_file_mode
from qlis.errors import QlisError
from qlis.models.checkpoints import load_state_dict
from qlis.models.tensors import tensor_layout
from qlis_iqa.errors import IQAError, WeightsNotFoundError
from qlis_iqa.families import RANDOM_INIT_FLAG, RANDOM_LABEL, Family, get_family
from qlis_iqa.schema import MAX_CONFIG_CHARS, MAX_PARAMETERS, parse_config

try:  # huggingface_hub >= 0.33 validates config fields strictly (an int for a float, say)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older: configs are not strict dataclasses, nothing more to catch
    StrictDataclassError = ValueError

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds, paths are checked first
    from transformers import PretrainedConfig, PreTrainedModel


def _no_init_weights() -> AbstractContextManager:
    """transformers' context that skips weight initialisation (its home moved in 5.0)."""
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


SIZES = ("tiny", "full")


def attention(family: str) -> str | None:
    """How a backbone computes attention, whatever its config says: PyTorch's fused kernel
    ("sdpa", the same product as "eager" without holding heads x patches^2 scores per image: a
    160 KB checkpoint of 4,096 patches and 8 heads took 1.5 GB for one image eagerly) where
    this transformers has it for the family, else its default (None)."""
    return "sdpa" if getattr(get_family(family).model_cls, "_supports_sdpa", False) else None


def is_random_init(config: PretrainedConfig) -> bool:
    """True when the backbone was random-initialised by qlis-iqa (never pretrained)."""
    return bool(getattr(config, RANDOM_INIT_FLAG, False))


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Refuse a model holding NaN or infinite values: every score it gives would be NaN, and
    NaN correlations would be printed as if they were results (training "diverged")."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise IQAError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values "
                       f"(first: {bad[0][:80]!r}); refused")


def random_backbone(family: str, size: str = "tiny", seed: int = 0) -> PreTrainedModel:
    """A random-initialised backbone of the family: 'tiny' for tests, 'full' = the paper's shape."""
    fam = get_family(family)
    if size not in SIZES:
        raise IQAError(f"unknown backbone size {size!r}; use one of {list(SIZES)}")
    shape = fam.tiny_config if size == "tiny" else fam.full_config
    config = fam.config_cls(**shape, **{RANDOM_INIT_FLAG: True})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fam.model_cls(config, **fam.model_kwargs)
    return model.eval()


def save_random_backbone(
    family: str, out_dir: str | Path, size: str = "tiny", seed: int = 0
) -> Path:
    """Write a random-initialised backbone folder that `load_backbone` accepts. It is made in
    a hidden folder first (inside an existing ``out_dir``, else beside it) and its files are
    then moved in: a write that fails (a read-only folder, a full disk) leaves ``out_dir`` as
    it was, where ``save_pretrained`` into it rewrote config.json before the weights failed."""
    out = Path(out_dir)
    model = random_backbone(family, size, seed)
    try:
        with tempfile.TemporaryDirectory(dir=out if out.is_dir() else out.parent,
                                         prefix=f".{out.name}.") as tmp:
            model.save_pretrained(tmp)
            mode = new_file_mode(Path(tmp))  # safetensors writes its file 0600
            out.mkdir(exist_ok=True)
            for file in sorted(Path(tmp).iterdir()):
                os.chmod(file, mode)
                os.replace(file, out / file.name)
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise IQAError(f"{out}: the backbone could not be written ({reason})") from None
    return out


def build_backbone(
    family: str, config: Mapping[str, Any], attn_implementation: str | None = None
) -> PreTrainedModel:
    """An uninitialised backbone of a config validated by `schema.parse_config` (fast, no init).

    Builds on the current default device: under `torch.device("meta")` it allocates nothing.
    """
    fam = get_family(family)
    settings = dict(config)
    if attn_implementation is not None:
        settings["attn_implementation"] = attn_implementation
    try:
        cfg = fam.config_cls.from_dict(settings)
        with _no_init_weights():
            model = fam.model_cls(cfg, **fam.model_kwargs)
    except (ValueError, TypeError, KeyError, ImportError, StrictDataclassError) as exc:
        raise IQAError(f"the stored {fam.name} backbone config cannot be built: {exc}") from None
    return model.eval()


def _candidate_folders(fam: Family, folder: Path) -> list[Path]:
    org, name = fam.hub_id.split("/")
    return [folder, folder / name, folder / org / name]


def _hub_cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


def _download_hint(fam: Family) -> str:
    kwargs = ", add_pooling_layer=False" if fam.model_kwargs else ""
    return (
        f"On a machine with internet run `hf download {fam.hub_id}` (older hubs: "
        f"`huggingface-cli download {fam.hub_id}`) and copy its Hugging Face cache here "
        f'(set HF_HUB_CACHE), or run `python -c "from transformers import '
        f"{fam.model_class} as M; M.from_pretrained('{fam.hub_id}'{kwargs})"
        f".save_pretrained('{fam.repo_name}')\"` and pass --weights {fam.repo_name}; "
        f"without weights, `qlis-iqa make-backbone --family {fam.name} --size full -o DIR` "
        f"writes a random-initialised backbone"
    )


def _checked_config(fam: Family, source: str, cache_dir: Path | None) -> PretrainedConfig:
    """The config.json of a backbone to load, held to the bounds of a stored description
    (`schema.parse_config`) and at most MAX_PARAMETERS: transformers allocates what a config
    says (hidden_size=10**9, or 64 layers beside 2 layers of weights) and raises tracebacks
    on wrong types."""
    local = Path(source) / "config.json"
    if local.is_file() and local.stat().st_size > 4 * MAX_CONFIG_CHARS:  # read whole below
        raise IQAError(f"the {fam.name} backbone config in {source} is refused: "
                       f"{local.stat().st_size:,} bytes (at most {4 * MAX_CONFIG_CHARS:,})")
    try:
        config = fam.config_cls.from_pretrained(
            source, local_files_only=True, cache_dir=cache_dir
        )
        parse_config(fam.name, config.to_json_string())
        with torch.device("meta"):
            skeleton = fam.model_cls(config, **fam.model_kwargs)
    except IQAError as exc:
        raise IQAError(f"the {fam.name} backbone config in {source} is refused: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, RecursionError,
            StrictDataclassError) as exc:  # ImportError: an attention kernel not installed
        text = " ".join(str(exc).split()) or type(exc).__name__  # one line
        raise IQAError(f"the {fam.name} backbone config in {source} cannot be used: "
                       f"{text[:200]}") from None
    n_params = sum(p.numel() for p in skeleton.parameters())
    if n_params > MAX_PARAMETERS:
        raise IQAError(f"the {fam.name} backbone config in {source} builds {n_params:,} "
                       f"parameters (at most {MAX_PARAMETERS:,}); refused")
    return config


_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _pickle_only(folder: Path) -> str | None:
    """The pickled checkpoint a backbone folder holds instead of safetensors, if so: it is
    never loaded, since unpickling a downloaded file can run code."""
    if any((folder / name).exists() for name in _SAFETENSORS):
        return None
    return next((name for name in _PICKLED if (folder / name).exists()), None)


def _pickle_refused(where: Path, name: str) -> str:
    return (f"{where} holds only {name}, a pickle, which qlis-iqa never loads (it can run "
            "code); convert it to model.safetensors where you trust it (from_pretrained, "
            "then save_pretrained) or download the safetensors weights")


def _from_pretrained(fam: Family, source: str, cache_dir: Path | None) -> PreTrainedModel:
    config = _checked_config(fam, source, cache_dir)
    try:
        model, info = fam.model_cls.from_pretrained(
            source,
            config=config,
            local_files_only=True,
            cache_dir=cache_dir,
            use_safetensors=True,  # unset, transformers unpickles a pytorch_model.bin
            output_loading_info=True,
            **({"attn_implementation": kernel} if (kernel := attention(fam.name)) else {}),
            **fam.model_kwargs,
        )
    except RuntimeError:  # transformers' report of the shapes is logged, which is silenced
        raise IQAError(f"the weights in {source} do not fit its config.json: tensors of other "
                       "shapes than the config's") from None
    except (SafetensorError, ValueError, ImportError, RecursionError) as exc:
        # a damaged model.safetensors, a shard index that is no JSON or names files outside
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise IQAError(f"the weights in {source} cannot be loaded: {text[:200]}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise IQAError(
            f"the weights in {source} do not fit the {fam.title} backbone: {len(missing)} "
            f"tensors missing (first: {', '.join(missing[:3])}); is this a {fam.name} model?"
        )
    extra = _layers_past_the_config(model, info.get("unexpected_keys", ()))
    if extra:
        raise IQAError(
            f"the weights in {source} hold more layers than its config.json ({len(extra)} "
            f"tensors left unused, first: {extra[0]}); correct the config's layer count")
    integer = _integer_weight(source, model)
    if integer is not None:
        raise IQAError(f"the weights in {source}: tensor {integer!r} is stored as integers or "
                       "booleans where the backbone holds floating-point values")
    model = model.float().eval()  # weights stored in half precision run on float32 inputs
    check_finite(model, f"the weights in {source}")
    return model


_NUMBERED = re.compile(r"^((?:.*\.)?layers?)\.\d+\.")
"""A tensor of a numbered block: its container's name (``encoder.layers``, ``layer``)."""


def _layers_past_the_config(model: PreTrainedModel, unexpected: Any) -> list[str]:
    """The unused tensors of numbered blocks of a container the model has: a config of fewer
    layers than the weights loaded a shortened model, the rest dropped (another tower's
    tensors, a full CLIP's text model, are unused and harmless)."""
    containers = {m.group(1) for name in model.state_dict() if (m := _NUMBERED.match(name))}

    def ours(container: str) -> bool:  # under a task model's prefix too (``vit.layers``)
        return any(container == c or container.endswith(f".{c}") for c in containers)

    return sorted(name for name in unexpected if (m := _NUMBERED.match(name)) and ours(m[1]))


def _integer_weight(source: str, model: PreTrainedModel) -> str | None:
    """A tensor a local weights folder stores as integers or booleans where the model holds
    floats (from_pretrained casts it: every image then got one score), or None. Compared by
    the names' last part (``weight``, ``cls_token``): transformers renames the rest on load
    (a ViT's ``encoder.layer.0.attention.attention.key`` is its ``layers.0.attention.k_proj``),
    and integer buffers (``position_ids``) end otherwise."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    floating = {name.rpartition(".")[2] for name, t in model.state_dict().items()
                if t.is_floating_point()}
    try:
        layout = tensor_layout(load_state_dict(folder))
    except QlisError:  # what from_pretrained read, qlis' reader cannot: nothing to compare
        return None
    return next((name for name, t in layout.items() if not t.is_floating_point()
                 and name.rpartition(".")[2] in floating), None)


def load_backbone(
    family: str, weights: str | Path | None = None, cache_dir: str | Path | None = None
) -> PreTrainedModel:
    """Load a backbone offline from `weights` (a folder, or a hub id looked up in the HF cache).

    Without `weights` the paper's checkpoint id is looked up in the Hugging Face cache
    (`cache_dir`, else HF_HUB_CACHE). A folder may be the model folder itself or contain it
    under its repository name (e.g. `WEIGHTS/clip-vit-large-patch14`).
    """
    fam = get_family(family)
    looked: list[str] = []
    if weights is not None and Path(weights).expanduser().exists():
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise IQAError(f"--weights {folder} is a file; give the folder that holds config.json")
        for cand in _candidate_folders(fam, folder):
            config = cand / "config.json"
            if (config.exists() or config.is_symlink()) and not config.is_file():
                raise IQAError(f"{config} is not a regular file (a folder, a device, a pipe "
                               "or a link to nowhere); give the backbone's own config.json")
            if config.is_file():
                if pickled := _pickle_only(cand):
                    raise IQAError(_pickle_refused(cand, pickled))
                try:
                    return _from_pretrained(fam, str(cand), None)
                except OSError as exc:
                    msg = f"cannot load the {fam.name} backbone from {cand}: {exc}"
                    raise IQAError(msg) from None
            looked.append(f"{cand} (no config.json)")
        hub_id, hub_cache = fam.hub_id, folder  # the folder may itself be a Hugging Face cache
    else:
        hub_id = str(weights) if weights is not None else fam.hub_id
        if weights is not None and (hub_id.startswith((".", "/", "~")) or hub_id.count("/") > 1):
            raise IQAError(f"--weights {hub_id}: no such folder")
        hub_cache = _hub_cache_dir(cache_dir)
    repo_dir = hub_cache / ("models--" + hub_id.replace("/", "--"))
    try:
        return _from_pretrained(fam, hub_id, hub_cache)
    except OSError:
        for snapshot in sorted(repo_dir.glob("snapshots/*")):  # a cache of .bin weights
            if pickled := _pickle_only(snapshot):
                raise IQAError(_pickle_refused(snapshot, pickled)) from None
        state = "incomplete" if repo_dir.exists() else "absent"
        looked.append(f"{repo_dir} ({state})")
    raise WeightsNotFoundError(
        f"{fam.title} weights not found offline; looked in: {'; '.join(looked)}. "
        + _download_hint(fam)
    )


def weights_label(model: PreTrainedModel, source: str | Path | None) -> str:
    """How results of this backbone are labelled: random-initialised, or where it came from."""
    if is_random_init(model.config):
        return RANDOM_LABEL
    return f"pretrained backbone ({source or model.config.name_or_path})"
