"""What the backend feeds the model: each document's images (cached across cells), the prompt through the
processor's chat template, and the encoded batch; and how a generated text is cut at its stop strings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def doc_label(req) -> str:
    """A request's document, as errors name it."""
    return f"task {req.task_name} doc {req.doc_id}"


def stop_at(text: str, until) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    if isinstance(until, str):
        until = [until]
    for stop in until or ():
        if stop:
            text = text.split(stop, 1)[0]
    return text


class Inputs:
    """The input half of `VTPLlava` (harness.evaluation.lmms_backend), which mixes it in."""

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The doc's images, from the run's cache when an earlier cell already loaded them (keyed by
        the doc's content too, so a changed doc is loaded afresh)."""
        if doc_to_visual is None:
            return []
        doc = self.task_dict[task][split][doc_id]
        key = (task, split, doc_id, hashlib.blake2b(repr(doc).encode(), digest_size=16).hexdigest())
        images = self._visual_cache.get(key)
        if images is None:
            images = self._load_visuals(doc_to_visual(doc), doc_id, task)
            self._visual_cache.put(key, images, sum(im.width * im.height * len(im.getbands()) for im in images))
        return images

    @staticmethod
    def _load_visuals(visuals, doc_id, task) -> list:
        from PIL import Image

        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images = []
        for v in visuals:
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB"))
            elif isinstance(v, str) and Path(v).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"):
                with Image.open(v) as im:
                    images.append(im.convert("RGB"))
            else:
                raise TypeError(f"{task} doc {doc_id}: vtp_llava takes images (PIL or image paths); got "
                                f"{type(v).__name__} {str(v)[:80]!r}. Give videos as a list of frames.")
        return images

    def build_prompt(self, ctx: str, n_images: int) -> str:
        """The user turn through the processor's chat template, image placeholders first (none are
        added when the task already put ``<image>`` in ``ctx``), then the generation prompt."""
        content = [] if (n_images == 0 or self.image_token in ctx) else [{"type": "image"}] * n_images
        content = content + [{"type": "text", "text": ctx}]
        if getattr(self._processor, "chat_template", None):
            return self._processor.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True, tokenize=False)
        images = self.image_token * (len(content) - 1)
        return f"USER: {images + chr(10) if images else ''}{ctx} ASSISTANT:"

    def _encode(self, prompts: list[str], images: list[list], padding_side: str = "left"):
        flat = [im for row in images for im in row]
        inputs = self._processor(text=prompts, images=flat or None, padding=True, padding_side=padding_side,
                                 return_tensors="pt")
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    def _visual_counts(self, input_ids: torch.Tensor) -> list[int]:
        return (input_ids == self.image_token_id).sum(-1).tolist()
