"""lmms-eval entry point (group ``lmms_eval.models``, declared in pyproject.toml).

lmms-eval 0.7.3 loads it while ``lmms_eval.models`` is being imported, so this module must stay
import-light: no torch, no transformers, nothing of the harness. The class itself is imported
lazily by lmms-eval from ``simple_class_path``. A failing entry point makes lmms-eval skip every
entry point after it (one WARNING), so keep this trivially correct.

One backend for every family (the checkpoint's config picks it): ``--model vtp_llava`` (the first name,
kept) or its alias ``--model vtp``. The alias lives in the manifest (``ModelManifest.aliases``, resolved by
the registry), so the entry point in pyproject.toml stays as it is.
"""

from __future__ import annotations

MODEL_ID = "vtp_llava"
ALIASES = ("vtp",)
CLASS_PATH = "harness.evaluation.lmms_backend.VTPLlava"


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    # simple protocol only: multiple_choice tasks need it (chat models cannot run loglikelihood).
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=ALIASES)
