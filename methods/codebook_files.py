"""The codebook file: the release's format, so its published codebooks load too.

    codebook.pt          torch.save of one fp16 tensor [prototypes, hidden] (the projector space)
    codebook.json        the source image ids, one per prototype (as released)
    codebook.build.json  ours: the build configuration, thresholds and statistics (absent in releases)

A codebook is tied to one model's projector space: loading checks it is a finite floating-point
matrix, and `check_hidden` compares its width with the model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTBED_CODEBOOK = "harness/testbed/codebook/codebook.pt"


class CodebookError(ValueError):
    """A codebook file that is missing, unreadable or of the wrong shape or type."""


def resolve(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the repository root (where the testbed codebook lives)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def save(path: str | os.PathLike, prototypes: torch.Tensor, sources: list, build: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(prototypes.detach().to("cpu", torch.float16).contiguous(), tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(sources))
    path.with_suffix(".build.json").write_text(json.dumps(build, indent=2))
    return path


def load(path: str | os.PathLike) -> torch.Tensor:
    """The prototypes as a float32 CPU tensor [P, D] (a release's CUDA-saved file included)."""
    p = resolve(path)
    if not p.is_file():
        raise CodebookError(f"codebook not found: {p} (build one with `harness codebook build`, or pass the "
                            f"path of a released .pt codebook)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not where torch failed
        raise CodebookError(f"codebook {p} is not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, torch.Tensor):
        raise CodebookError(f"codebook {p} holds a {type(blob).__name__}; expected one tensor [prototypes, hidden]")
    if blob.ndim != 2 or blob.shape[0] == 0:
        raise CodebookError(f"codebook {p} has shape {tuple(blob.shape)}; expected [prototypes, hidden] "
                            f"with at least one prototype")
    if not blob.is_floating_point():
        raise CodebookError(f"codebook {p} has dtype {blob.dtype}; expected a floating-point tensor (fp16 as released)")
    blob = blob.float()
    if not bool(torch.isfinite(blob).all()):
        raise CodebookError(f"codebook {p} contains NaN or infinite values")
    return blob


def build_record(path: str | os.PathLike) -> dict:
    """The build configuration beside a codebook, or {} for a released one."""
    record = resolve(path).with_suffix(".build.json")
    return json.loads(record.read_text()) if record.is_file() else {}


def check_hidden(prototypes: torch.Tensor, hidden: int, path) -> None:
    if prototypes.shape[1] != hidden:
        raise CodebookError(f"codebook {path} has hidden size {prototypes.shape[1]}, but this model's projector "
                            f"outputs {hidden}: a codebook belongs to the model it was built on")
