"""What the backend feeds the model: each document's visuals (images, and videos as frames; cached across
cells), the prompt through the processor's chat template, and the encoded batch; and how a generated text is
cut at its stop strings.

A document's visuals (what its task's ``doc_to_visual`` returns: one visual or a list of them, in order):

- an image: a PIL image, or the path of an image file;
- a video: a list or tuple of frames (PIL images or image paths), or the path of a video file
  (``VIDEO_SUFFIXES``), decoded with PyAV into ``video_frames`` frames sampled uniformly over it.

So ``[im1, im2]`` is two images and ``[[f1, f2, f3, f4]]`` one video of four frames. Loaded, an image is a
PIL image and a video a ``list`` of PIL frames (`is_video`). Only the families whose processor has a video
placeholder take videos (``VIDEO_FAMILIES``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: The families whose processor has a video placeholder and whose config a video token id (their adapters
#: prune video frames); LLaVA-1.5 and LLaVA-NeXT take images only.
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
#: Frames sampled from a video file (backend model_arg ``video_frames``). 8 keeps a CPU run and the tests
#: cheap (visual tokens grow linearly with frames); lmms-eval's own llava_onevision samples 32, so set
#: ``video_frames=32`` to compare absolute scores with its runs (comparisons with the unpruned model hold
#: at any count: every cell sees the same frames).
DEFAULT_VIDEO_FRAMES = 8
VIDEO_READER_INSTALL = "pip install av"


class VisualInputError(InputError):
    """A document's visual that the backend cannot take (its type, a missing or unreadable file, a video
    for an image-only family)."""


class VideoReaderMissing(VisualInputError):
    """A video file to decode, and PyAV (the video reader) is not installed."""


def _video_reader_missing(where: str) -> VideoReaderMissing:
    return VideoReaderMissing(f"{where}: decoding video files needs PyAV, which is not installed: "
                              f"{VIDEO_READER_INSTALL} (or give videos as lists of frames)")


def parse_video_frames(value) -> int:
    """The backend's ``video_frames`` model_arg (a string from a model_args string) as a positive integer."""
    try:
        frames = int(str(value).strip())
    except ValueError:
        frames = 0
    if frames < 1:
        raise VisualInputError(f"video_frames must be a positive integer (frames sampled from each video file), "
                               f"got {value!r}")
    return frames


def video_reader_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def check_video_reader(what: str = "video tasks") -> None:
    """Raise VideoReaderMissing, one line, unless PyAV is importable: for the runner, before the model loads,
    when a task gives video files (`what` names them in the message)."""
    if not video_reader_available():
        raise _video_reader_missing(what)


def _images_only(model_type: str, what: str) -> VisualInputError:
    return VisualInputError(f"{what}, but {model_type} takes images only; the families that take videos: "
                            f"{', '.join(VIDEO_FAMILIES)}")


def check_takes_video(model_type: str, what: str = "a video task") -> None:
    """Raise VisualInputError, one line, unless the family (a config's model_type) takes videos: for the runner,
    before the model loads, when a task gives videos (`what` names them: "task videomme")."""
    if model_type not in VIDEO_FAMILIES:
        raise _images_only(model_type, f"{what} gives videos")


def is_video(visual) -> bool:
    """Whether a loaded visual is a video (a list of PIL frames) rather than an image."""
    return isinstance(visual, list)


def visual_bytes(visuals) -> int:
    """The loaded visuals' size in memory (images and video frames), as the visual cache counts it."""
    frames = [f for v in visuals for f in (v if is_video(v) else [v])]
    return sum(f.width * f.height * len(f.getbands()) for f in frames)


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


def _suffix(v) -> str | None:
    return Path(v).suffix.lower() if isinstance(v, (str, os.PathLike)) else None


def _accepted() -> str:
    return (f"accepted: a PIL image or an image path ({', '.join(IMAGE_SUFFIXES)}); a video as a list of frames "
            f"or a video path ({', '.join(VIDEO_SUFFIXES)})")


def sample_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` frame indices spread uniformly over `total` frames, the first and the last included
    (one frame: the middle one)."""
    n = min(n, total)
    if n == 1:
        return [(total - 1) // 2]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def read_video(path, frames: int, where: str) -> list:
    """`frames` RGB PIL frames sampled uniformly over the video file at `path` (all of them when it has fewer),
    decoded with PyAV; a VisualInputError naming `where` and the file when it cannot be read."""
    try:
        import av
    except ImportError:
        raise _video_reader_missing(where) from None
    if not Path(path).is_file():
        raise VisualInputError(f"{where}: video file {path} does not exist")

    def decode(picks: list[int]) -> tuple[list, int]:
        """The frames at `picks` (ascending), and how many frames were decoded to reach them."""
        wanted, out, seen = set(picks), [], 0
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for seen, frame in enumerate(container.decode(stream), 1):
                if seen - 1 in wanted:
                    out.append(frame.to_image().convert("RGB"))
                if seen - 1 >= picks[-1]:
                    break
        return out, seen

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VisualInputError(f"{where}: {path} holds no video stream")
            stream = container.streams.video[0]
            # the header's count; some containers leave it 0: count the packets (no decoding)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if total <= 0:
            raise VisualInputError(f"{where}: {path} holds no video frames")
        picks = sample_indices(total, frames)
        out, seen = decode(picks)
        if len(out) < len(picks):  # the header over-counted: `seen` is the true count (decoding reached the end)
            if seen == 0:
                raise VisualInputError(f"{where}: {path} holds no decodable video frames")
            out, _ = decode(sample_indices(seen, frames))
    except av.FFmpegError as e:
        raise VisualInputError(f"{where}: cannot decode video file {path}: {e}") from None
    return out


class Inputs:
    """The input half of `VTPLlava` (harness.evaluation.lmms_backend), which mixes it in. Uses the backend's
    `model_type`, `video_frames`, `image_token`, `video_token` and `video_token_id`."""

    @property
    def takes_video(self) -> bool:
        """Whether this model's family takes videos: its processor has a video placeholder, its config an id."""
        return bool(getattr(self._processor, "video_token", None)) and getattr(self, "video_token_id", None) is not None

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The doc's visuals, loaded (images, videos as frame lists), from the run's cache when an earlier cell
        already loaded them (keyed by the doc's content too, so a changed doc is loaded afresh)."""
        if doc_to_visual is None:
            return []
        doc = self.task_dict[task][split][doc_id]
        key = (task, split, doc_id, hashlib.blake2b(repr(doc).encode(), digest_size=16).hexdigest(),
               self.video_frames)
        visuals = self._visual_cache.get(key)
        if visuals is None:
            try:
                given = doc_to_visual(doc)
            except SystemExit as e:  # lmms-eval's video tasks sys.exit() when a video file is missing
                raise VisualInputError(f"task {task} doc {doc_id}: the task's doc_to_visual stopped: {e}") from None
            visuals = self._load_visuals(given, doc_id, task)
            self._visual_cache.put(key, visuals, visual_bytes(visuals))
        return visuals

    def _load_visuals(self, visuals, doc_id, task) -> list:
        """Each visual loaded: an image as an RGB PIL image, a video as a list of them (module docstring)."""
        where = f"task {task} doc {doc_id}"
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        loaded = []
        for i, v in enumerate(visuals):
            if isinstance(v, (list, tuple)):  # a video given as its frames
                self._check_takes_video(where)
                if not v:
                    raise VisualInputError(f"{where}: visual {i} is an empty list of frames")
                loaded.append([self._image(f, f"{where}, visual {i} (a video), frame {j}") for j, f in enumerate(v)])
            elif _suffix(v) in VIDEO_SUFFIXES:
                self._check_takes_video(where)
                loaded.append(read_video(v, self.video_frames, where))
            else:
                loaded.append(self._image(v, f"{where}, visual {i}"))
        return loaded

    @staticmethod
    def _image(v, where: str):
        from PIL import Image

        if isinstance(v, Image.Image):
            return v.convert("RGB")
        if _suffix(v) in IMAGE_SUFFIXES:
            try:
                with Image.open(v) as im:
                    return im.convert("RGB")
            except OSError as e:
                raise VisualInputError(f"{where}: cannot read image file {v}: {e}") from None
        raise VisualInputError(f"{where}: vtp_llava cannot take {type(v).__name__} {repr(v)[:80]}; {_accepted()}")

    def _check_takes_video(self, where: str) -> None:
        if not self.takes_video:
            raise _images_only(self.model_type, f"{where} gives a video")

    def build_prompt(self, ctx: str, visuals) -> str:
        """The user turn through the processor's chat template: a placeholder per visual in the document's order
        (``{"type": "video"}`` for a video, ``{"type": "image"}`` for an image; none of a kind whose placeholder
        the task already put in ``ctx``), then the text and the generation prompt. `visuals`: the loaded
        visuals, or a number of images."""
        kinds = ["image"] * visuals if isinstance(visuals, int) else \
            ["video" if is_video(v) else "image" for v in visuals]
        placeholder = {"image": self.image_token, "video": getattr(self, "video_token", None) or ""}
        kinds = [k for k in kinds if not (placeholder[k] and placeholder[k] in ctx)]
        content = [{"type": k} for k in kinds] + [{"type": "text", "text": ctx}]
        if getattr(self._processor, "chat_template", None):
            return self._processor.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True, tokenize=False)
        tokens = "".join(placeholder[k] for k in kinds)
        return f"USER: {tokens + chr(10) if tokens else ''}{ctx} ASSISTANT:"

    @staticmethod
    def _budget_units(visuals: list, inputs) -> int:
        """What a budget applies to in one prompt's visuals: an image, or a video's frame (Qwen: its temporal
        step of `temporal_patch_size` frames, `video_grid_thw`'s t), as the adapters give each its budget."""
        videos = [v for v in visuals if is_video(v)]
        if videos and inputs.get("video_grid_thw") is not None:
            steps = int(inputs["video_grid_thw"][:, 0].sum())
        else:
            steps = sum(len(v) for v in videos)
        return len(visuals) - len(videos) + steps

    def _encode(self, prompts: list[str], visuals: list[list], padding_side: str = "left"):
        """The batch through the processor: each row's images (flat, in order) as ``images=`` and its videos
        (each a list of frames) as ``videos=``; a kind the batch lacks is not passed."""
        images = [v for row in visuals for v in row if not is_video(v)]
        videos = [v for row in visuals for v in row if is_video(v)]
        media = {"videos": videos} if videos else {}  # image-only processors take no `videos`
        inputs = self._processor(text=prompts, images=images or None, padding=True, padding_side=padding_side,
                                 return_tensors="pt", **media)
        inputs = inputs.to(self._device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs and inputs[name].is_floating_point():
                inputs[name] = inputs[name].to(self._model.dtype)
        return inputs
