"""Validation of the ``vtp_llava`` backend's model_args that must stay light (no torch, no
lmms_eval import), so ``harness run`` reports a bad ``--model`` at once (budgets: ``harness.budget``)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import InputError

LLAVA_MODEL_TYPES = ("llava",)


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

