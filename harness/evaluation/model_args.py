"""Validation of the backend's model_args: the checkpoint (a local folder, or a Hugging Face model id found in
the local cache), device, dtype and batch size. Light at import (torch and huggingface_hub are imported inside
the functions that need them, no lmms_eval), so ``harness run`` reports a bad ``--model`` at once, before
anything loads (budgets: ``harness.budget``)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import InputError

#: The families the harness takes: config.json's model_type -> the transformers class the backend loads.
#: (harness.adapters.FAMILIES maps the same names to their adapters.)
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration",
                 "llava_next": "LlavaNextForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
#: Files of a hub checkpoint the harness needs (config, weights, tokenizer, processor, chat template): what
#: an online run downloads, and what an offline run requires of a cached snapshot.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
#: dtype names the backend takes -> torch dtype attribute
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CheckpointError(InputError):
    """``pretrained`` is missing, not in the local cache, incomplete, or of a family the harness does not take."""


def download_command(repo_id: str) -> str:
    """The command that puts a hub model where :func:`check_pretrained` finds it (the CLI of huggingface_hub)."""
    return f"hf download {repo_id}"


def is_hub_id(text: str) -> bool:
    """`org/name` that is not a path on this machine: a Hugging Face model id (a bare name is taken for a
    folder: every family's checkpoints are under an organisation)."""
    if text.count("/") != 1 or text.startswith(("/", ".", "~")) or Path(text).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_id_of(folder) -> str | None:
    """The model id of a snapshot folder of the Hugging Face cache (`.../models--org--name/snapshots/<commit>`)."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")  # ids cannot hold "--"
    return None


def _cached_snapshot(repo_id: str) -> Path:
    """The folder of `repo_id` in the local Hugging Face cache; downloaded only where hub access was turned
    back on (HF_HUB_OFFLINE=0: harness.evaluation.lmms_compat sets it to 1 otherwise)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE  # read now (HF_HOME / HF_HUB_CACHE as this process started)
    get = download_command(repo_id)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES, local_files_only=True))
    except IncompleteSnapshotError as e:
        raise CheckpointError(f"model {repo_id} is only partly in the local Hugging Face cache ({e.snapshot_path}): "
                              f"finish the download with `{get}`") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"model {repo_id} is not in the local Hugging Face cache ({cache}) and hub access is off: download "
                f"it with `{get}` (into that cache; HF_HOME or HF_HUB_CACHE point the harness at another one), or "
                f"`{get} --local-dir DIR` and give DIR as the model") from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES))
    except Exception as e:  # no such repository, gated, no network: one line, what the hub said
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model {repo_id} could not be downloaded ({first}); `{get}` says more") from None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))


def _check_weights(folder: Path, repo_id: str | None) -> None:
    """Weights present, and every shard a sharded checkpoint's index names."""
    where = (f"model {repo_id} is in the local Hugging Face cache ({folder})" if repo_id
             else f"checkpoint folder {folder} has a config.json")
    fix = f": download them with `{download_command(repo_id)}`" if repo_id else ""
    if not _weight_files(folder):
        raise CheckpointError(f"{where} but no weights (*.safetensors){fix}")
    for index in folder.glob("*.index.json"):
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except ValueError as e:
            raise CheckpointError(f"{index} is not valid JSON: {e}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{where} but not all its weights: {len(missing)} of the {len(shards)} shards "
                                  f"{index.name} lists are missing ({missing[0]}, ...){fix}")


def check_pretrained(pretrained) -> str:
    """The checkpoint's folder (a local folder, or a hub model id's snapshot in the local Hugging Face cache),
    or a :class:`CheckpointError` saying in one line what is wrong with it and what to do."""
    if pretrained is None or str(pretrained).strip() == "":
        raise CheckpointError("vtp_llava needs pretrained=<a checkpoint folder (save_pretrained) or a Hugging Face "
                              "model id>")
    text = str(pretrained).strip()
    repo_id = text if is_hub_id(text) else None
    if repo_id:
        folder = _cached_snapshot(repo_id)
    else:
        folder = Path(text).expanduser()
        if not folder.exists():
            raise CheckpointError(f"model not found: {text} does not exist (give a checkpoint folder or a Hugging "
                                  "Face model id, org/name)")
        folder = folder.resolve()
    config_file = folder / "config.json"
    if not config_file.is_file():
        if repo_id:
            raise CheckpointError(f"model {repo_id} is in the local Hugging Face cache ({folder}) without its "
                                  f"config.json: download it with `{download_command(repo_id)}`")
        raise CheckpointError(f"{folder} is not a Hugging Face checkpoint folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(f"{text} is a {model_type!r} checkpoint; the harness takes model_type "
                              f"{', '.join(MODEL_CLASSES)}")
    _check_weights(folder, repo_id)
    return str(folder)


def model_type_of(folder) -> str:
    """The model_type of a folder :func:`check_pretrained` accepted."""
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def model_class(model_type: str):
    """The transformers class of a family (`MODEL_CLASSES`)."""
    import transformers

    return getattr(transformers, MODEL_CLASSES[model_type])


def resolve_device(device) -> str:
    """cpu, or a CUDA device torch sees (one GPU per data-parallel rank for plain `cuda`)."""
    import os

    import torch

    device = str(device or "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA device")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per data-parallel rank
    return device


def resolve_dtype(dtype, device: str):
    """None: float32 on CPU, bfloat16 on CUDA; "auto": the checkpoint's; else a dtype name."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, DTYPES[str(dtype).lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}") from None


def parse_batch_size(batch_size) -> int:
    """A positive int (the lmms-eval CLI passes a string)."""
    try:
        value = int(str(batch_size))  # the lmms-eval CLI passes a string
    except ValueError:
        raise ValueError(
            f"batch_size must be a positive integer, got {batch_size!r} ('auto' is not supported)") from None
    if value < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return value
