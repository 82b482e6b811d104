"""A Hugging Face model folder as a module that runs, offline, for calibration.

Only calibration from the command line needs the model to run (``qlis pack --calib``); qlis
itself does not depend on transformers, which is imported here when asked for. The module's
class is the folder's ``config.json`` architecture (so a checkpoint with a task head keeps its
head), built on the CPU; its weights are read by qlis' own loader (no pickle, every tensor
validated) and assigned to it. Nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.modules.module as registration

from qlis.errors import InputError, first_line
from qlis.models.checkpoints import check_folder_links, load_state_dict, read_config
from qlis.models.tensors import tensor_label

_MAX_EXAMPLE_CHARS = 20_000
# config.json entries that size the module transformers builds. Each must be an integer that
# the folder's weights can justify: a width at most their element count, a layer count at most
# their tensor count. Unchecked, hidden_size=10**9 allocates terabytes and
# num_hidden_layers=10**6 builds modules for hours, all before a weight is compared. Position
# counts are left to _check_skeleton: a rotary model's need not be within its weights.
_LAYER_KEYS = frozenset({
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
    "decoder_layers", "num_decoder_layers",
})
_WIDTH_KEYS = frozenset({
    "hidden_size", "intermediate_size", "vocab_size", "n_embd", "n_inner",
    "num_attention_heads", "n_head", "n_heads", "num_heads",
    "num_key_value_heads", "head_dim", "d_model", "d_ff", "d_kv", "ffn_dim", "encoder_ffn_dim",
    "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads", "type_vocab_size",
    "embedding_size", "dim", "hidden_dim",
    "num_labels",  # transformers builds id2label with this many entries, weights or not
})
# The module built may hold at most twice the folder's elements (float16 weights, a float32
# module) plus this slack for buffers that are not saved (position ids, rotary tables).
_BUFFER_SLACK_ELEMENTS = 1 << 24


def _transformers() -> Any:
    try:
        import transformers  # optional: only running a model folder needs it
    except ImportError:
        raise InputError("running a Hugging Face model folder needs transformers: "
                         "pip install transformers") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _quietly() -> contextlib.ExitStack:
    """transformers prints notices to stdout/stderr; a CLI says one line or nothing."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _without_initialising() -> contextlib.AbstractContextManager:
    """Build the module without filling its weights with random values: the folder's replace
    them at once, and filling them would hold the whole model in memory once more (the
    folder's are mapped from its files, read as they are used)."""
    for where in ("initialization", "modeling_utils"):  # transformers 5, then 4
        try:
            module = importlib.import_module(f"transformers.{where}")
        except ImportError:
            continue
        if callable(getattr(module, "no_init_weights", None)):
            return module.no_init_weights()
    return contextlib.nullcontext()


def _check_config_sizes(folder: Path, config: dict, tensors: int, elements: int) -> None:
    """Refuse a config.json whose sizes the weights cannot justify (see _WIDTH_KEYS), in
    nested configs too (text_config, vision_config), before transformers builds anything. A
    size may be a list of one per stage (Swin's ``num_heads``), each entry checked, and no
    more entries than the weights have tensors."""
    pending = [config]
    while pending:
        entries = pending.pop()
        for key, value in entries.items():
            if isinstance(value, dict):
                pending.append(value)
                continue
            limit = tensors if key in _LAYER_KEYS else elements if key in _WIDTH_KEYS else None
            if limit is None or value is None:
                continue
            sizes = value if type(value) is list and 0 < len(value) <= tensors else [value]
            for size in sizes:
                if type(size) is not int or not 0 <= size <= limit:
                    shown = repr(size) if type(size) is int else type(size).__name__
                    raise InputError(
                        f"{folder / 'config.json'}: {tensor_label(key)} is {shown[:40]}; it "
                        f"must be an integer from 0 to {limit:,}, or a list of such (the "
                        f"weights hold {tensors:,} tensors of {elements:,} elements)"
                    )


def _conversions() -> tuple[Any, Any] | None:
    """transformers' modules that rename checkpoint keys as it loads them (5 and later), or
    None where it renames none (4)."""
    try:
        return (importlib.import_module("transformers.conversion_mapping"),
                importlib.import_module("transformers.core_model_loading"))
    except ImportError:
        return None


def _as_module_names(folder: Path, skeleton: torch.nn.Module,
                     state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The folder's tensors under the names its module holds them by. transformers 5 renames
    some families' checkpoint keys as it loads them, and its save_pretrained writes the old
    ones back (ViT's and DINOv2's ``attention.attention.query`` is ``attention.q_proj`` in the
    module); a tensor it would merge with others or split as it loads is refused, since the
    module would run on something other than the folder's tensors."""
    modules = _conversions()
    if modules is None:
        return dict(state)
    conversion, loading = modules
    try:
        transforms = conversion.get_model_conversion_mapping(skeleton)
    except Exception:  # noqa: BLE001 - a model transformers keeps no mapping for
        return dict(state)
    renamings = [t for t in transforms if not isinstance(t, loading.WeightConverter)]
    converters = [t for t in transforms if isinstance(t, loading.WeightConverter)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name, converted = loading.rename_source_key(key, renamings, converters)
        if converted is not None:
            raise InputError(f"{folder}: transformers merges or splits tensor "
                             f"{tensor_label(key)} as it loads this model, which calibration "
                             "cannot follow; pack this folder without --calib")
        if name in renamed:
            raise InputError(f"{folder}: tensors {tensor_label(key)} and another both load "
                             f"as {tensor_label(name)}")
        renamed[name] = tensor
    return renamed


def _without_recomputed_buffers(skeleton: torch.nn.Module,
                                state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The folder's tensors less those that name a buffer the module makes for itself and
    does not save (BERT's ``embeddings.position_ids``, which checkpoints written before
    transformers 4.31 hold): transformers leaves them out as it loads, and so does qlis."""
    saved = skeleton.state_dict()
    recomputed = {name for name, _ in skeleton.named_buffers() if name not in saved}
    return {name: tensor for name, tensor in state.items() if name not in recomputed}


def _check_skeleton(folder: Path, skeleton: torch.nn.Module,
                    state: Mapping[str, torch.Tensor], elements: int) -> None:
    """The module that the config describes, built on the meta device (no memory), against the
    weights: their names, shapes and kinds, and its size bounded by theirs, all before the
    module is built for real."""
    expected = skeleton.state_dict()
    name = type(skeleton).__name__
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(f"{folder}: the weights hold {len(unexpected)} tensor(s) that "
                         f"{name} does not have, e.g. {tensor_label(unexpected[0])}")
    for key, tensor in state.items():
        wanted = expected[key]
        if tuple(tensor.shape) != tuple(wanted.shape):
            raise InputError(f"{folder}: tensor {tensor_label(key)} has shape "
                             f"{list(tensor.shape)}, the config asks for {list(wanted.shape)}")
        if tensor.is_floating_point() != wanted.is_floating_point():
            raise InputError(f"{folder}: tensor {tensor_label(key)} is {tensor.dtype}, where "
                             f"{name} holds {wanted.dtype}")
    held = sum({id(t): t.numel() for t in (*skeleton.parameters(), *skeleton.buffers())}
               .values())
    if held > 2 * elements + _BUFFER_SLACK_ELEMENTS:
        raise InputError(f"{folder}: its config.json describes a {name} of {held:,} elements, "
                         f"its weights hold {elements:,}")


_MODULES_PER_TENSOR = 64
"""Modules a build may register per tensor of the weights (plus `_MODULE_SLACK`): a layer
holds a few tensors and a dozen modules, dropouts and activations included."""
_MODULE_SLACK = 10_000


class _BuildTooLarge(Exception):
    """A build registered more modules than the weights can justify."""


@contextlib.contextmanager
def _bounded_build(limit: int) -> Iterator[None]:
    """Within the block, module construction stops (`_BuildTooLarge`) past ``limit``
    modules: a config count that no listed key bounds (ALBERT's ``inner_group_num`` of
    300,000) built for minutes and 7.5 GB, on the meta device, before the finished skeleton
    could be compared with the weights (its sizes cost nothing there: `_check_skeleton`)."""
    built = 0

    def count(_module: torch.nn.Module, _name: str, _child: torch.nn.Module | None) -> None:
        nonlocal built
        built += 1
        if built > limit:
            raise _BuildTooLarge(f"more than {limit:,} modules")

    hook = registration.register_module_module_registration_hook(count)
    try:
        yield
    finally:
        hook.remove()


def _builder(folder: Path, transformers: Any) -> Callable[[], torch.nn.Module]:
    """What builds the folder's module from its config.json (weights left unfilled)."""
    with _quietly():
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel

    def build() -> torch.nn.Module:
        with _quietly(), _without_initialising():
            return cls.from_config(config) if cls is transformers.AutoModel else cls(config)

    return build


def load_hf_model(folder: str | Path) -> torch.nn.Module:
    """The model of a Hugging Face folder (config.json + weights), in eval mode.

    The weights are read first and bound what the config may build: its sizes are checked
    against them, then the module is built on the meta device and compared with them, and
    only then built in memory. Its state dict (and so an archive packed from it) names the
    tensors as the module does, which for some families is not as their files do
    (`_as_module_names`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: calibration needs a model that can run: a Hugging Face "
                         "model folder with a config.json (a bare state dict cannot run)")
    transformers = _transformers()
    state = load_state_dict(folder)
    elements = sum(math.prod(tensor.shape) for tensor in state.values())
    _check_config_sizes(folder, read_config(folder), len(state), elements)
    try:  # transformers' own checks raise anything (ZeroDivisionError for zero heads)
        build = _builder(folder, transformers)
        with torch.device("meta"), _bounded_build(_MODULES_PER_TENSOR * len(state)
                                                  + _MODULE_SLACK):
            skeleton = build()
    except _BuildTooLarge as err:
        raise InputError(f"{folder}: its config.json describes a model of {err}, which its "
                         f"weights ({len(state):,} tensors of {elements:,} elements) cannot "
                         "fill") from None
    except Exception as err:  # noqa: BLE001 - a hostile config.json, not a bug of ours
        detail = first_line(err) or type(err).__name__
        raise InputError(f"{folder}: transformers cannot build this model from its "
                         f"config.json ({detail})") from None
    state = _without_recomputed_buffers(skeleton, _as_module_names(folder, skeleton, state))
    _check_skeleton(folder, skeleton, state, elements)
    model = build()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = model.state_dict()
    given = {loaded[n].data_ptr() for n in state}
    untied = [name for name in loaded if name not in state
              and loaded[name].data_ptr() not in given]
    untied = [name for name in untied if not _made_by_the_class(model, name)]
    if untied:
        raise InputError(f"{folder}: the weights lack {len(untied)} tensor(s) the model needs, "
                         f"e.g. {tensor_label(untied[0])}")
    return model.eval()


def _made_by_the_class(model: Any, name: str) -> bool:
    """Whether the model's class makes tensor ``name`` itself when a file lacks it (a name
    it ignores when missing: Marian's sinusoidal position tables, which its files leave
    out), and it was made so now (the module was built without initialising)."""
    ignored = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    if not any(re.search(pattern, name) for pattern in ignored):
        return False
    owner, _, attribute = name.rpartition(".")
    try:  # transformers' own initialisation of that module
        module = model.get_submodule(owner)
        model._init_weights(module)
    except Exception:  # noqa: BLE001 - a class that cannot make it: the tensor is missing
        return False
    return bool(torch.isfinite(getattr(module, attribute)).all())


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer (tokenizer.json / vocab files), offline."""
    transformers = _transformers()
    advice = ("give the model's inputs as tensors instead (a .safetensors file of keyword "
              "inputs, e.g. pixel_values)")
    check_folder_links(folder)  # the tokenizer reads whichever of its files it finds
    try:
        with _quietly():
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                Path(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - whatever the tokenizer files make it raise
        # the tokenizers library raises a bare Exception for a tokenizer.json it cannot
        # read (an unknown model type, a bad pattern, a vocabulary that is not UTF-8);
        # RecursionError: a tokenizer file nested past Python's JSON parser's depth
        raise InputError(f"{folder}: no usable tokenizer for text calibration "
                         f"({first_line(err) or type(err).__name__}); "
                         f"{advice}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        # transformers builds a tokenizer from config.json alone, which reads every word as
        # its unknown token
        raise InputError(f"{folder}: no tokenizer files (the tokenizer transformers builds "
                         f"without them knows only its {len(tokenizer)} special tokens); "
                         f"{advice}")
    return tokenizer


def max_input_length(model: torch.nn.Module) -> int | None:
    """The longest input a Hugging Face model's position table takes (its config's
    ``max_position_embeddings`` or ``n_positions``), None when it does not say. RoBERTa-style
    tables count positions from their padding index + 1, so those positions are not usable.
    Tokenizers saved without ``model_max_length`` say nothing of it."""
    config = getattr(model, "config", None)
    positions = (getattr(config, "max_position_embeddings", None)
                 or getattr(config, "n_positions", None))
    if type(positions) is not int or positions < 1:
        return None
    base = getattr(model, "base_model", model)
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None:
        positions -= table.padding_idx + 1
    return max(positions, 1)


def tokenized_batches(tokenizer: Any, lines: list[str], batch_size: int,
                      max_length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Text examples as keyword batches, padded and truncated to the model's length (the
    tokenizer's ``model_max_length``, ``max_length`` (`max_input_length`) and 512, the
    least)."""
    stated = getattr(tokenizer, "model_max_length", None)  # tokenizer_config.json's, unchecked
    usable = isinstance(stated, int | float) and not isinstance(stated, bool) and stated >= 1
    limit = min(int(min(stated, 512)) if usable else 512, 512, max_length or 512)
    if getattr(tokenizer, "pad_token", None) is None:  # GPT-2 style: pad with end-of-text
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif batch_size > 1:
            raise InputError("the tokenizer has no padding token: give one example per batch "
                             "(--calib-batch-size 1)")
    batches = []
    for start in range(0, len(lines), batch_size):
        chunk = [line[:_MAX_EXAMPLE_CHARS] for line in lines[start:start + batch_size]]
        try:
            encoded = tokenizer(chunk, return_tensors="pt", padding=len(chunk) > 1,
                                truncation=True, max_length=limit)  # one: nothing to pad
        except Exception as err:  # noqa: BLE001 - whatever the tokenizer's files make it do
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}) failed on "
                             f"calibration lines {start + 1}-{start + len(chunk)}: "
                             f"{type(err).__name__}: {first_line(err)}") from None
        ids = encoded.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1] == 0:
            raise InputError(
                f"the tokenizer ({type(tokenizer).__name__}) turns calibration lines "
                f"{start + 1}-{start + len(chunk)} into no tokens at all: its files are not "
                "the ones its class reads (transformers picks the class by model_type)")
        batches.append(dict(encoded))
    return batches


def check_input_names(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                      source: object) -> None:
    """Refuse calibration tensors under a name that is not a tensor input of the model's
    ``forward``: transformers 5's models take any other keyword into ``**kwargs`` and
    ignore it, so a misspelt ``atention_mask`` calibrated without its mask, and a flag such
    as ``return_dict`` given as a tensor went through. A forward of ``**kwargs`` alone names
    nothing to check against."""
    parameters = inspect.signature(model.forward).parameters.values()
    named = {p.name: p.annotation for p in parameters
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not named:
        return
    inputs = sorted(name for name, annotation in named.items()
                    if annotation is inspect.Parameter.empty or "Tensor" in str(annotation))
    for key in sorted({key for batch in batches for key in batch}):
        if key not in inputs:
            raise InputError(f"{source}: calibration tensor {key!r} is not a tensor input of "
                             f"{type(model).__name__} (its inputs: {', '.join(inputs)})")


def check_token_ids(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                    source: object) -> None:
    """Refuse token ids that the model's tables have no row for (``input_ids`` past its
    vocabulary: a tokenizer or a file of another model; ``token_type_ids`` past its
    segments; ``position_ids``, or sequences, past its position table), by name and limit,
    before a pass fails on them with torch's "index out of range in self" (a GPT-2 of 64
    positions given 100 valid ids said only that)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # an image model: no token table
        embeddings = None
    limits = {}
    if isinstance(embeddings, torch.nn.Embedding):
        limits["input_ids"] = ("rows in its token embedding", embeddings.num_embeddings)
    segments = getattr(getattr(model, "config", None), "type_vocab_size", None)
    if type(segments) is int and segments >= 1:
        limits["token_type_ids"] = ("token types (type_vocab_size)", segments)
    positions = max_input_length(model)
    if positions is not None:
        limits["position_ids"] = ("positions (its position table)", positions)
    decoder = _decoder_embeddings(model)
    if decoder is not None:
        limits["decoder_input_ids"] = ("rows in its decoder's token embedding",
                                       decoder.num_embeddings)
    for index, batch in enumerate(batches):
        tokens = batch.get("input_ids")
        if positions is not None and isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and (
                tokens.shape[1] > positions):
            raise InputError(f"{source}: calibration batch {index} holds sequences of "
                             f"{tokens.shape[1]} tokens; the model's position table holds "
                             f"{positions}: cut them to its length")
        for key, (what, limit) in limits.items():
            ids = batch.get(key)
            if not (isinstance(ids, torch.Tensor) and ids.numel()) or ids.is_floating_point():
                continue
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= limit:
                raise InputError(f"{source}: calibration batch {index} holds {key} "
                                 f"{high if high >= limit else low}; the model has {limit} "
                                 f"{what} (ids 0-{limit - 1}): calibrate with this model's "
                                 "own tokenizer")


def _decoder_embeddings(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """An encoder-decoder's decoder token table (BART's, T5's, Whisper's), None for other
    models or where the model does not say."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        table = model.get_decoder().get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return table if isinstance(table, torch.nn.Embedding) else None


def with_decoder_inputs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                        ) -> list[dict[str, torch.Tensor]]:
    """Batches for an encoder-decoder model (T5, BART, Pegasus, Whisper) that give no
    decoder inputs, with the decoder fed the text shifted right, as in training (the model's
    own ``prepare_decoder_input_ids_from_labels`` where it has one: a base model such as
    ``PegasusModel`` has not, and its shift is the start token then the ids), or, for
    inputs that are no text (Whisper's ``input_features``), the start token alone: without
    decoder inputs such a model cannot run, and its decoder weights would get no
    calibration. Other models' batches are returned as they are."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return batches
    given = ("decoder_input_ids", "decoder_inputs_embeds")
    needed = [i for i, batch in enumerate(batches) if not any(k in batch for k in given)]
    if not needed:
        return batches
    start = getattr(config, "decoder_start_token_id", None)
    if type(start) is not int:
        # the shift starts the decoder's inputs with it (transformers 5 no longer gives T5
        # one by default: a config saved by it has none, and T5's shift fails on the lookup)
        raise InputError(
            f"this {type(model).__name__}'s config gives no decoder_start_token_id, which "
            "its decoder's inputs start with: set it in config.json (T5: 0, its padding "
            "token) or give decoder_input_ids in the calibration batches")
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    fed = list(batches)
    for i in needed:
        ids = batches[i].get("input_ids")
        examples = len(next(iter(batches[i].values())))
        if not (isinstance(ids, torch.Tensor) and ids.ndim == 2):
            decoder = torch.full((examples, 1), start, dtype=torch.long)
        elif callable(prepare):
            decoder = prepare(labels=ids)
        else:
            decoder = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
        fed[i] = {**batches[i], "decoder_input_ids": decoder}
    return fed
