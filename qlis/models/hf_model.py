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
import io
from pathlib import Path
from typing import Any

import torch

from qlis.errors import InputError
from qlis.models.checkpoints import load_state_dict

_MAX_EXAMPLE_CHARS = 20_000


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


def load_hf_model(folder: str | Path) -> torch.nn.Module:
    """The model of a Hugging Face folder (config.json + weights), in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: calibration needs a model that can run: a Hugging Face "
                         "model folder with a config.json (a bare state dict cannot run)")
    transformers = _transformers()
    try:
        with _quietly():
            config = transformers.AutoConfig.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False)
            names = getattr(config, "architectures", None) or []
            cls = getattr(transformers, names[0], None) if names else None
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                cls = transformers.AutoModel
            with _without_initialising():
                model = (cls.from_config(config) if cls is transformers.AutoModel
                         else cls(config))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"{folder}: transformers cannot build this model from its "
                         f"config.json ({str(err).splitlines()[0][:300]})") from None
    state = load_state_dict(folder)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(f"{folder}: the weights hold {len(unexpected)} tensor(s) that "
                         f"{type(model).__name__} does not have, e.g. {unexpected[0]!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(f"{folder}: tensor {name!r} has shape {list(tensor.shape)}, the "
                             f"config asks for {list(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = model.state_dict()
    given = {loaded[n].data_ptr() for n in state}
    untied = [name for name in expected if name not in state
              and loaded[name].data_ptr() not in given]
    if untied:
        raise InputError(f"{folder}: the weights lack {len(untied)} tensor(s) the model needs, "
                         f"e.g. {untied[0]!r}")
    return model.eval()


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer (tokenizer.json / vocab files), offline."""
    transformers = _transformers()
    try:
        with _quietly():
            return transformers.AutoTokenizer.from_pretrained(
                Path(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"{folder}: no usable tokenizer for text calibration "
                         f"({str(err).splitlines()[0][:300]})") from None


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
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512,
                max_length or 512)
    if getattr(tokenizer, "pad_token", None) is None:  # GPT-2 style: pad with end-of-text
        if getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif batch_size > 1:
            raise InputError("the tokenizer has no padding token: give one example per batch "
                             "(--calib-batch-size 1)")
    batches = []
    for start in range(0, len(lines), batch_size):
        chunk = [line[:_MAX_EXAMPLE_CHARS] for line in lines[start:start + batch_size]]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                            max_length=limit)
        batches.append(dict(encoded))
    return batches
