"""Validation of the ``vtp_llava`` backend's model_args: the checkpoint, device, dtype and batch size.
Light at import (torch is imported inside the functions that need it, no lmms_eval), so ``harness run``
reports a bad ``--model`` at once (budgets: ``harness.budget``)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import InputError

LLAVA_MODEL_TYPES = ("llava",)
#: dtype names the backend takes -> torch dtype attribute
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CheckpointError(InputError):
    """``pretrained`` is missing or is not a LLaVA checkpoint."""


def check_pretrained(pretrained) -> str:
    """The checkpoint location, or a :class:`CheckpointError` saying what is wrong with it."""
    if pretrained is None or str(pretrained).strip() == "":
        raise CheckpointError("vtp_llava needs pretrained=<folder of a LLaVA checkpoint (save_pretrained)>")
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a Hugging Face checkpoint folder: it has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        model_type = config.get("model_type")
        location = str(path.resolve())
    else:
        # Not a folder: maybe a hub id already in the local cache (we run offline).
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(str(pretrained)).model_type
        except Exception:
            raise CheckpointError(
                f"model not found: {pretrained!r} is not a folder, nor a model id in the local Hugging Face "
                "cache (hub access is off)") from None
        location = str(pretrained)
    if model_type not in LLAVA_MODEL_TYPES:
        raise CheckpointError(
            f"{pretrained} is a {model_type!r} checkpoint; vtp_llava loads LLaVA checkpoints "
            f"(model_type {' / '.join(map(repr, LLAVA_MODEL_TYPES))}, LlavaForConditionalGeneration)")
    return location


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
