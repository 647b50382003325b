"""Processors for the Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision families where transformers cannot build theirs.

`load_processor(pretrained)` is the one way the harness loads a processor: `AutoProcessor.from_pretrained`,
and only where that fails because torchvision is missing (transformers sees no torchvision and the
checkpoint's `model_type` is one of `STAND_INS`) a stand-in from this module. In transformers 5.23 those
three processors take a video processor, and video processors exist only with torchvision (the lock leaves
it out: README "The lock"; harness/testbed/tiny_families.py explains the failure). Their tokenizers and PIL
image processors need no torchvision, so the stand-in is the processor's own glue around them:

- images: exactly the image processor's output (called as the real processor calls it), and each image
  placeholder expanded to the count the real processor computes (Qwen: grid_t*grid_h*grid_w / merge**2;
  OneVision: base crop + unpadded anyres grid + one newline a row, reduced per `anyres_max_N`);
  `mm_token_type_ids` (1 image, 2 video) for Qwen, which its M-RoPE needs; the same keys as the real one.
- videos (lists of PIL frames): the video processor's steps on PIL instead of torchvision (`QwenFrames`,
  `OnevisionFrames`). What differs: frames are resized with PIL's bicubic (as the image processors do)
  rather than torchvision's, so pixel values can differ by a grey level or so; shapes, grids and token
  counts are the same. Frames are used as given (no frame sampling: the real default for these models).
- chat template, `save_pretrained` (the files the real processor writes: tokenizer, chat_template.jinja,
  processor_config.json with the image and video processor nested) and `from_pretrained`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import InputError

#: model_type -> the transformers processor it stands in for (class set below).
STAND_INS: dict[str, type[StandInProcessor]] = {}


class ProcessorInputError(InputError):
    """Text, images and videos that do not fit together (placeholders and media in different numbers)."""


def torchvision_missing() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def stand_in_for(pretrained: str) -> type[StandInProcessor] | None:
    """The stand-in class where transformers cannot build this checkpoint's processor for want of torchvision."""
    if not torchvision_missing():
        return None
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(pretrained).model_type
    except (OSError, ValueError, KeyError):  # no readable config: not a checkpoint this module can speak for
        return None
    return STAND_INS.get(model_type)


def load_processor(pretrained: str):
    """The checkpoint's processor: transformers' own, or where torchvision is missing for it, the stand-in."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(pretrained)
    except Exception:
        stand_in = stand_in_for(pretrained)
        if stand_in is None:
            raise
        return stand_in.from_pretrained(pretrained)  # raised inside: the first failure stays as its context


# ------------------------------------------------------------------------------------------ file helpers
def _file(pretrained: str, name: str) -> Path | None:
    """A file of a local folder or of a cached hub checkpoint, or None."""
    folder = Path(pretrained)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _json(pretrained: str, name: str) -> dict:
    path = _file(pretrained, name)
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def _chat_template(pretrained: str, processor_dict: dict, tokenizer) -> str | None:
    """Where transformers looks for it: chat_template.jinja, chat_template.json, the processor config, the tokenizer."""
    if path := _file(pretrained, "chat_template.jinja"):
        return path.read_text(encoding="utf-8")
    if template := _json(pretrained, "chat_template.json").get("chat_template"):
        return template
    return processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)


def _frames(video) -> list:
    """A video as a list of RGB PIL frames (given as PIL frames or a (T, H, W, C) uint8 array)."""
    from PIL import Image

    if hasattr(video, "ndim"):
        video = [Image.fromarray(np.asarray(frame)) for frame in video]
    return [frame.convert("RGB") for frame in video]


def _is_frame(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (hasattr(x, "ndim") and x.ndim == 3)


def _videos(videos) -> list[list]:
    """A batch of videos: one video (frames or a 4-D array) or a list of them."""
    if hasattr(videos, "ndim") and videos.ndim == 4 or (isinstance(videos, (list, tuple)) and videos
                                                        and _is_frame(videos[0])):
        videos = [videos]
    return [_frames(v) for v in videos]


def _flat(images) -> list:
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flat(item)]
    return [images]


# ------------------------------------------------------------------------------------- video processors
class _Frames:
    """The video processor's settings and steps, on PIL frames (no torchvision). Settings load and save as
    the transformers video processor it stands in for (`processor_type`) writes them."""

    processor_type = ""
    model_input_names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }

    def __init__(self, **settings):
        known = {k: v for k, v in settings.items() if k in self.defaults}
        for key, value in {**self.defaults, **known}.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, settings: dict) -> _Frames:
        return cls(**settings)

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.defaults}, "video_processor_type": self.processor_type}

    def __repr__(self):
        return f"{type(self).__name__}({self.to_dict()})"

    def _frame(self, frame, height: int, width: int) -> np.ndarray:
        """One frame resized (PIL), rescaled and normalised, channels first, float32."""
        from PIL import Image

        if self.do_resize and (frame.height, frame.width) != (height, width):
            frame = frame.resize((width, height), resample=Image.Resampling(self.resample))
        x = np.asarray(frame, dtype=np.float64)
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean)) / np.asarray(self.image_std)
        return x.transpose(2, 0, 1).astype(np.float32)


class QwenFrames(_Frames):
    """Qwen2-VL's video processor: smart resize to the video pixel limits, then temporal patches of
    `temporal_patch_size` frames (an incomplete last one is filled by repeating the last frame)."""

    processor_type = "Qwen2VLVideoProcessor"
    model_input_names = ("pixel_values_videos", "video_grid_thw")
    defaults: ClassVar[dict[str, Any]] = {
        **_Frames.defaults, "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "cap_pixels_per_frame": None,
        "max_video_tokens": 128000}

    def __init__(self, min_pixels: int | None = None, max_pixels: int | None = None, **settings):
        size = dict(settings.pop("size", None) or self.defaults["size"])
        # the older spelling (Qwen's hub configs): pixel limits as keys of `size` or as arguments
        min_pixels = min_pixels if min_pixels is not None else size.pop("min_pixels", None)
        max_pixels = max_pixels if max_pixels is not None else size.pop("max_pixels", None)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        super().__init__(size=size, **settings)

    def _resized(self, height: int, width: int, frames: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,
        )

        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        max_pixels = self.size["longest_edge"]
        if self.cap_pixels_per_frame:  # an even share of the whole video's budget, as the real one does
            budget = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, budget * self.temporal_patch_size // frames),
                             int(self.size["shortest_edge"] * 1.05))
        return smart_resize(height, width, factor=factor, min_pixels=self.size["shortest_edge"],
                            max_pixels=max_pixels)

    def __call__(self, videos, return_tensors=None):
        from transformers import BatchFeature

        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        patches, grids = [], []
        for frames in _videos(videos):
            height, width = self._resized(frames[0].height, frames[0].width, len(frames))
            video = np.stack([self._frame(f, height, width) for f in frames])  # (T, C, H, W)
            if pad := -len(video) % tp:
                video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
            t, h, w = len(video) // tp, height // p, width // p
            x = video.reshape(t, tp, video.shape[1], h // m, m, p, w // m, m, p)
            # the vision tower's order: merge windows row-major, within one the 2x2 patches, each C x T x p x p
            x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1)
            patches.append(x)
            grids.append([t, h, w])
        data = {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.array(grids, dtype=np.int64)}
        return BatchFeature(data, tensor_type=return_tensors)


class OnevisionFrames(_Frames):
    """LLaVA-OneVision's video processor: every frame resized to `size`, rescaled and normalised."""

    processor_type = "LlavaOnevisionVideoProcessor"
    model_input_names = ("pixel_values_videos",)
    defaults: ClassVar[dict[str, Any]] = {**_Frames.defaults, "size": {"height": 384, "width": 384}}

    def _target(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        short = self.size["shortest_edge"]  # aspect kept, the short side to `shortest_edge`
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    def __call__(self, videos, return_tensors=None):
        from transformers import BatchFeature

        out = [np.stack([self._frame(f, *self._target(f.height, f.width)) for f in frames])
               for frames in _videos(videos)]
        if return_tensors and len({v.shape for v in out}) == 1:
            out = np.stack(out)
        return BatchFeature({"pixel_values_videos": out}, tensor_type=return_tensors)


# ------------------------------------------------------------------------------------------- processors
class StandInProcessor:
    """What the harness uses of a transformers processor: call, chat template, decode, save and load.
    Subclasses say how many placeholder tokens an image or a video becomes."""

    processor_class = ""  # the transformers processor stood in for (written to processor_config.json)
    frames_class: type[_Frames] = _Frames
    default_image_token = default_video_token = ""
    return_mm_token_type_ids = False
    init_keys: tuple[str, ...] = ()  # the real processor's own settings, saved in processor_config.json

    def __init__(self, image_processor, tokenizer, video_processor=None, chat_template=None, **settings):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.video_processor = video_processor if video_processor is not None else self.frames_class()
        self.chat_template = chat_template
        unknown = set(settings) - set(self.init_keys)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected settings {sorted(unknown)}")
        self.image_token = getattr(tokenizer, "image_token", None) or settings.get("image_token") \
            or self.default_image_token
        self.video_token = getattr(tokenizer, "video_token", None) or settings.get("video_token") \
            or self.default_video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    # ------------------------------------------------------------------ counts (per family)
    def image_token_counts(self, pixels, n_images: int) -> list[int]:
        raise NotImplementedError

    def video_token_counts(self, pixels, n_videos: int) -> list[int]:
        raise NotImplementedError

    def _video_extras(self, videos, pixels) -> dict:
        return {}

    # ------------------------------------------------------------------ call
    def __call__(self, images=None, text=None, videos=None, **kwargs):
        from transformers import BatchFeature

        return_tensors = kwargs.pop("return_tensors", None)
        images_kwargs, videos_kwargs = kwargs.pop("images_kwargs", {}), kwargs.pop("videos_kwargs", {})
        text_kwargs = {**kwargs.pop("text_kwargs", {}), **kwargs}
        return_mm = text_kwargs.pop("return_mm_token_type_ids", self.return_mm_token_type_ids)
        video_metadata = text_kwargs.pop("video_metadata", None)
        if images is None and text is None and videos is None:
            raise ProcessorInputError(f"{type(self).__name__} needs text, images or videos; got none")
        text = [text] if isinstance(text, str) else (None if text is None else list(text))
        if images is not None:
            images = self.image_processor.fetch_images(images)
        n_images = len(_flat(images)) if images is not None else 0
        videos = _videos(videos) if videos is not None else None
        self._check_counts(text, n_images, len(videos) if videos is not None else 0)

        data, image_tokens, video_tokens = {}, [], []
        if images is not None:
            pixels = self.image_processor(images, return_tensors=return_tensors, **images_kwargs)
            image_tokens = self.image_token_counts(pixels, n_images)
            data.update(pixels)
        if videos is not None:
            pixels = self.video_processor(videos, return_tensors=return_tensors, **videos_kwargs)
            video_tokens = self.video_token_counts(pixels, len(videos))
            data.update(pixels)
            data.update(self._video_extras(video_metadata, pixels))
        if text is None:
            return BatchFeature(data, tensor_type=return_tensors)

        text = self._expand(text, image_tokens, video_tokens)
        encoded = self.tokenizer(text, return_tensors=return_tensors, **text_kwargs)
        rows = [list(map(int, ids)) for ids in encoded["input_ids"]]
        self._check_expanded(text, rows)
        if return_mm:
            encoded["mm_token_type_ids"] = [[1 if i == self.image_token_id else 2 if i == self.video_token_id else 0
                                             for i in ids] for ids in rows]
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)

    def _check_counts(self, text, n_images: int, n_videos: int):
        for token, n, kind in ((self.image_token, n_images, "image"), (self.video_token, n_videos, "video")):
            in_text = sum(t.count(token) for t in text) if text is not None else n
            if in_text != n:
                raise ProcessorInputError(
                    f"the prompts hold {in_text} {token} placeholders but {n} {kind}s were given: "
                    f"give one {kind} for each {token}, in order")

    def _expand(self, text: list[str], image_tokens: list[int], video_tokens: list[int]) -> list[str]:
        """Each placeholder, in order over the batch, becomes as many copies as its image or video takes."""
        counts = {self.image_token: iter(image_tokens), self.video_token: iter(video_tokens)}
        pattern = re.compile("|".join(re.escape(t) for t in counts))
        return [pattern.sub(lambda m: m.group() * next(counts[m.group()]), t) for t in text]

    def _check_expanded(self, text: list[str], rows: list[list[int]]):
        """Every placeholder survived tokenisation (truncation would leave the model fewer than its features)."""
        for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
            if [t.count(token) for t in text] != [ids.count(token_id) for ids in rows]:
                raise ProcessorInputError(f"{token} placeholders were cut by tokenisation (truncation or "
                                          "max_length): the model would get fewer than its visual features")

    # ------------------------------------------------------------------ chat template, decode
    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt=False,
                            tokenize=False, return_dict=False, return_tensors=None, processor_kwargs=None, **kwargs):
        """The conversation through the chat template (the tokenizer renders it, as the real processor's
        rendering does); with `tokenize`, the media in the messages (PIL images, lists of frames) are encoded."""
        template = chat_template or self.chat_template
        if isinstance(self.chat_template, dict):  # several templates: by name, else the default
            template = self.chat_template.get(chat_template or "default", chat_template)
        if template is None:
            raise ProcessorInputError("this processor has no chat template")
        prompt = self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt, **kwargs)
        if not tokenize:
            return prompt
        batched = isinstance(conversation[0], (list, tuple))
        images, videos = [], []
        for messages in conversation if batched else [conversation]:
            blocks = [b for m in messages if isinstance(m.get("content"), list) for b in m["content"]]
            media = (next((b[k] for k in ("image", "url", "path") if b.get(k) is not None), None)
                     for b in blocks if b.get("type") == "image")
            images.append([m for m in media if m is not None])
            videos.extend(b["video"] for b in blocks if b.get("type") == "video" and "video" in b)
        images = images if any(images) else None
        out = self(text=prompt if batched else [prompt], images=images, videos=videos or None,
                   return_tensors=return_tensors, **(processor_kwargs or {}))
        return out if return_dict else out["input_ids"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        names += list(self.frames_class.model_input_names)
        return names + (["mm_token_type_ids"] if self.return_mm_token_type_ids else [])

    def __repr__(self):
        return (f"{type(self).__name__} (stand-in for {self.processor_class}, torchvision missing):\n"
                f"- image_processor: {self.image_processor!r}\n- video_processor: {self.video_processor!r}")

    # ------------------------------------------------------------------ save, load
    def _settings(self) -> dict:
        return {}

    def save_pretrained(self, save_directory) -> list[str]:
        """The files the real processor writes: tokenizer files, chat_template.jinja and processor_config.json
        (image and video processor nested, the processor's settings, its class name)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(self.tokenizer, "_set_processor_class"):  # tokenizer_config.json names the processor, as there
            self.tokenizer._set_processor_class(self.processor_class)
        self.tokenizer.save_pretrained(folder)
        template = self.chat_template
        if isinstance(template, dict):
            (folder / "chat_templates").mkdir(exist_ok=True)
            for name, text in template.items():
                if name != "default":
                    (folder / "chat_templates" / f"{Path(name).name}.jinja").write_text(text, encoding="utf-8")
            template = template.get("default")
        if isinstance(template, str):
            (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        config = {"image_processor": self.image_processor.to_dict(), "video_processor": self.video_processor.to_dict(),
                  "processor_class": self.processor_class, **self._settings()}
        path = folder / "processor_config.json"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [str(path)]

    @classmethod
    def _settings_from(cls, processor_dict: dict, config) -> dict:
        return {}

    @classmethod
    def from_pretrained(cls, pretrained: str) -> StandInProcessor:
        """Tokenizer, PIL image processor, video settings (where transformers would find them: nested in
        processor_config.json, video_preprocessor_config.json, else the image processor's file), chat template."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        image_processor = AutoImageProcessor.from_pretrained(pretrained, backend="pil")
        processor_dict = _json(pretrained, "processor_config.json")
        video = (processor_dict.get("video_processor") or _json(pretrained, "video_preprocessor_config.json")
                 or _json(pretrained, "preprocessor_config.json"))
        return cls(image_processor, tokenizer, cls.frames_class.from_dict(video),
                   chat_template=_chat_template(pretrained, processor_dict, tokenizer),
                   **cls._settings_from(processor_dict, AutoConfig.from_pretrained(pretrained)))


class QwenVLStandIn(StandInProcessor):
    """Qwen2-VL: an image takes grid_t*grid_h*grid_w / merge**2 tokens, a video likewise with its grid."""

    processor_class = "Qwen2VLProcessor"
    frames_class = QwenFrames
    default_image_token, default_video_token = "<|image_pad|>", "<|video_pad|>"
    return_mm_token_type_ids = True

    def image_token_counts(self, pixels, n_images):
        grids = np.asarray(pixels["image_grid_thw"]).reshape(-1, 3)
        return [int(g.prod()) // self.image_processor.merge_size ** 2 for g in grids]

    def video_token_counts(self, pixels, n_videos):
        grids = np.asarray(pixels["video_grid_thw"]).reshape(-1, 3)
        return [int(g.prod()) // self.video_processor.merge_size ** 2 for g in grids]


class Qwen25VLStandIn(QwenVLStandIn):
    """Qwen2.5-VL: as Qwen2-VL, and videos say their seconds per temporal patch (frames at 24 fps unless
    `video_metadata` gives `fps`, as in transformers)."""

    processor_class = "Qwen2_5_VLProcessor"

    def _video_extras(self, video_metadata, pixels):
        n = len(pixels["video_grid_thw"])
        fps = [(m or {}).get("fps") or 24 for m in (video_metadata or [None] * n)]
        return {"second_per_grid_ts": [self.video_processor.temporal_patch_size / f for f in fps]}

    @property
    def model_input_names(self):
        return super().model_input_names + ["second_per_grid_ts"]


class OnevisionStandIn(StandInProcessor):
    """LLaVA-OneVision: an image alone in its prompt takes the base crop's tokens plus its anyres grid
    with a newline a row (reduced to at most `anyres_max_N` crops' worth); an image among several takes
    the base tokens and one newline; a video takes frames x pooled crop tokens, plus one newline."""

    processor_class = "LlavaOnevisionProcessor"
    frames_class = OnevisionFrames
    default_image_token, default_video_token = "<image>", "<video>"
    init_keys = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "video_token",
                 "vision_aspect_ratio")

    def __init__(self, image_processor, tokenizer, video_processor=None, chat_template=None,
                 num_image_tokens: int | None = None, vision_feature_select_strategy: str | None = None,
                 vision_aspect_ratio: str = "anyres_max_9", **settings):
        super().__init__(image_processor, tokenizer, video_processor, chat_template, **settings)
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio

    def image_tokens(self, height: int, width: int, crop_height: int, crop_width: int) -> int:
        """Tokens of one image of `height` x `width` that is patched (alone in its prompt)."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), self.image_processor.image_grid_pinpoints)
        side = math.isqrt(self.num_image_tokens)  # features a crop side
        rows, cols = side * (best_h // crop_height), side * (best_w // crop_width)
        # the image was fitted into the crops' canvas keeping its aspect: drop the rows or columns of padding
        if width / height > cols / rows:
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        grid, newlines = rows * cols, rows
        most = int(self.vision_aspect_ratio.removeprefix("anyres_max_"))
        shrink = math.sqrt(rows * cols / (most * side ** 2))
        if shrink > 1.1:  # more than `most` crops' worth: the grid is pooled down
            grid, newlines = int(rows // shrink) * int(cols // shrink), int(rows // shrink)
        return grid + newlines + self.num_image_tokens

    def image_token_counts(self, pixels, n_images):
        per_prompt = [int(n) for n in np.asarray(pixels["batch_num_images"]).reshape(-1)]
        alone = [n == 1 for n in per_prompt for _ in range(n)]
        crop_h, crop_w = np.asarray(pixels["pixel_values"][0][0]).shape[-2:]
        counts = []
        for i, (h, w) in enumerate(np.asarray(pixels["image_sizes"]).reshape(-1, 2).tolist()):
            n = self.image_tokens(h, w, int(crop_h), int(crop_w)) if alone[i] else self.num_image_tokens + 1
            counts.append(n - (self.vision_feature_select_strategy == "default"))
        return counts

    def video_token_counts(self, pixels, n_videos):
        pooled = math.ceil(math.isqrt(self.num_image_tokens) / 2) ** 2
        return [len(v) * pooled + 1 for v in pixels["pixel_values_videos"]]

    def _settings(self):
        return {"num_image_tokens": self.num_image_tokens, "image_token": self.image_token,
                "video_token": self.video_token, "vision_aspect_ratio": self.vision_aspect_ratio,
                "vision_feature_select_strategy": self.vision_feature_select_strategy}

    @classmethod
    def _settings_from(cls, processor_dict, config):
        """The processor's saved settings; what a checkpoint lacks follows from its model config."""
        vision = config.vision_config
        derived = {"num_image_tokens": (vision.image_size // vision.patch_size) ** 2,
                   "vision_feature_select_strategy": config.vision_feature_select_strategy,
                   "vision_aspect_ratio": getattr(config, "vision_aspect_ratio", "anyres_max_9")}
        saved = {k: processor_dict[k] for k in cls.init_keys if processor_dict.get(k) is not None}
        return {**derived, **saved}


STAND_INS.update({"qwen2_vl": QwenVLStandIn, "qwen2_5_vl": Qwen25VLStandIn, "llava_onevision": OnevisionStandIn})

__all__ = ["STAND_INS", "OnevisionFrames", "OnevisionStandIn", "ProcessorInputError", "Qwen25VLStandIn",
           "QwenFrames", "QwenVLStandIn", "StandInProcessor", "load_processor", "stand_in_for", "torchvision_missing"]
