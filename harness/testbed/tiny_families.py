"""Tiny random models of every multimodal family the harness targets, saved like real checkpoints.

Each family (named by its config's `model_type`) is a randomly initialised model of the *real*
transformers class, built from its config classes, with a processor built offline and saved beside
the weights, so that `AutoConfig` / the processor / the model class `from_pretrained(folder)` load
it exactly like a downloaded checkpoint (the processor through `harness.adapters.processing.load_processor`:
`AutoProcessor`, or a stand-in where torchvision is missing). They exist so that tests and `harness run
--model <folder>` prove the real-class code paths (anyres crops and image_newline, dynamic resolution with the 2x2
merger and 3-D M-RoPE, SigLIP features and video frames) offline, on a CPU, in seconds. The weights
are random: answers are noise, but the same seed gives the same weights and the same answers.

Visual tokens are per testbed image (336x336, `world.render_pil`).

- llava: `LlavaForConditionalGeneration`, exactly the testbed's tiny model (`model.build_model` at
  `model.TINY`): CLIP ViT 32 wide, 2 layers, 2 heads at 336 px / patch 14; Llama 32 wide, 2 layers,
  4 heads (2 KV); 113k parameters; 576 visual tokens. LlavaProcessor, CLIP image processor (PIL),
  the testbed's byte-level BPE tokenizer (460 tokens, `<s>` prepended), LLaVA-1.5 chat template.
- llava_next: `LlavaNextForConditionalGeneration`: CLIP ViT 32 wide, 2 layers, 2 heads at 84 px /
  patch 14 (6x6 patches a crop, penultimate layer, CLS dropped), the same Llama as llava, anyres
  pinpoints [[84,168],[168,84],[168,168],[252,84],[84,252]] (LLaVA-NeXT's own, divided by 4): a
  336 px square is cut into 2x2 crops of 84 plus the base view, 36 + 12x12 + 12 newlines = 192
  visual tokens. LlavaNextProcessor, LlavaNextImageProcessorPil, the testbed tokenizer and chat
  template (llava-v1.6-vicuna's format is LLaVA-1.5's). 96k parameters.
- qwen2_vl: `Qwen2VLForConditionalGeneration`: ViT 32 wide (MLP 128), 2 layers, 2 heads, patch 14,
  temporal patch 2, 2x2 merger into a Qwen2 decoder 64 wide, 3 layers (FastV's default K = 2 fits), 4
  heads (2 KV), head dim 16, M-RoPE sections [2, 3, 3] (Qwen's [16, 24, 24] scaled to the head). Image processor
  min_pixels 56x56, max_pixels 224x224: a 336 px image becomes 224x224, 16x16 patches, 64 visual
  tokens. 221k parameters.
- qwen2_5_vl: `Qwen2_5_VLForConditionalGeneration`: the same, with Qwen2.5-VL's ViT (SwiGLU 32
  wide / 64 inner, RMSNorm, window attention of 112 px (2x2 windows here) in layer 0, full attention
  in layer 1); 64 visual tokens. 217k parameters.
- llava_onevision: `LlavaOnevisionForConditionalGeneration`: SigLIP ViT 32 wide, 2 layers, 2 heads
  at 84 px / patch 14 (36 tokens a crop, no CLS, last layer), a Qwen2 decoder 32 wide, 2 layers,
  4 heads (2 KV); pinpoints [[84,84],[84,168],[168,84],[168,168]], anyres_max_9: 192 visual tokens
  an image; a video of n frames gives n x 3x3 (2x2-pooled) + 1 newline tokens. 96k parameters.

Tokenizers are the testbed's BPE (`model.build_tokenizer`, trained once a process): as is for the
LLaVA families, with `<video>` added for OneVision, and for Qwen the same vocabulary and merges with
Qwen's special tokens in place of the testbed's (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>`
eos, `<|image_pad|>`, then `<|vision_start|>`, `<|vision_end|>`, `<|video_pad|>`), no BOS, and
Qwen2-VL-Instruct's chat template.

The torchvision situation: the processors of qwen2_vl, qwen2_5_vl and llava_onevision need
torchvision, which this environment leaves out (README "The lock"). In transformers 5 their
`__init__` takes a `video_processor` and `ProcessorMixin` checks it against `VideoProcessorMixin`,
which transformers exports only when torchvision is installed (`VIDEO_PROCESSOR_MAPPING` is then a
dummy, and the check dies with "VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'"); the
video processors themselves (`BaseVideoProcessor`) require torchvision, and `AutoProcessor` loads
one eagerly and raises ImportError (upstream: huggingface/transformers#48558, #43986). Nothing is
downloaded: it is a missing package. Their tokenizers and PIL image processors need no torchvision.
So where torchvision is missing these three get harness.adapters.processing's stand-in: the same
tokenizer, image processor and chat template, the real processor's placeholder expansion (the same
`input_ids`, `mm_token_type_ids`, pixel values and grids for images, tested against the real
classes), and videos on PIL (its docstring says what differs). `save()` writes the files the real
processor writes, and `harness.adapters.processing.load_processor(folder)` reads them back (with
`AutoProcessor` where torchvision is installed; then `build()` uses the real processors too).
`uses_stand_in(family)` says which one a family gets here.

    python -m harness.testbed.tiny_families llava_next /tmp/tiny-llava-next
    python -m harness.testbed.tiny_families qwen2_5_vl /tmp/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.adapters import processing as P
from harness.errors import InputError

from . import model as M
from . import world as W

# ----------------------------------------------------------------------------------------------- sizes
VISION = {"hidden": 32, "layers": 2, "heads": 2}  # every family's ViT
CROP = 84  # LLaVA-NeXT / OneVision crop side: 6x6 patches of 14
LLAVA_NEXT_PINPOINTS = [[84, 168], [168, 84], [168, 168], [252, 84], [84, 252]]
ONEVISION_PINPOINTS = [[84, 84], [84, 168], [168, 84], [168, 168]]
QWEN_TEXT = {"hidden": 64, "layers": 3, "heads": 4, "kv_heads": 2, "intermediate": 128, "mrope_section": [2, 3, 3]}
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 224 * 224  # a 336 px image -> 224x224 -> 64 tokens
QWEN_VIDEO_MAX_PIXELS = 112 * 112  # a frame -> 112x112 -> 16 tokens a 2-frame step

# ------------------------------------------------------------------------------------------- tokenizers
VIDEO_TOKEN = "<video>"
QWEN_RENAMES = {"<pad>": "<|endoftext|>", "<s>": "<|im_start|>", "</s>": "<|im_end|>",
                M.IMAGE_TOKEN: "<|image_pad|>"}
QWEN_ADDED = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")

# Qwen2-VL-Instruct's template (Qwen2.5-VL's is the same).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The testbed's LLaVA-1.5 format, with videos: "USER: <image><video>\n{question} ASSISTANT:".
ONEVISION_CHAT_TEMPLATE = M.CHAT_TEMPLATE.replace(
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}",
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'video' %}{{ '<video>' }}{% endif %}",
).replace("selectattr('type', 'equalto', 'image')", "selectattr('type', 'in', ['image', 'video'])")


@functools.cache
def _testbed_tokenizer():
    """The testbed tokenizer at the tiny model's vocabulary (BPE training takes seconds: once a process)."""
    return M.build_tokenizer(M.TINY.vocab_size)


def _fast_tokenizer(tokenizer_json: dict, added: tuple[str, ...], **kwargs):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(tokenizer_json))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=8192, padding_side="left", **kwargs)


def llava_tokenizer():
    """The testbed tokenizer (a copy: callers may change it)."""
    return copy.deepcopy(_testbed_tokenizer())


def onevision_tokenizer():
    """The testbed tokenizer with `<video>` added (id 460)."""
    return _fast_tokenizer(json.loads(_testbed_tokenizer().backend_tokenizer.to_str()), (VIDEO_TOKEN,),
                           pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                           extra_special_tokens={"image_token": M.IMAGE_TOKEN, "video_token": VIDEO_TOKEN})


def qwen_tokenizer():
    """The testbed BPE with Qwen's special tokens: ids 0-3 renamed (QWEN_RENAMES), QWEN_ADDED appended
    (460-462), no BOS (Qwen adds none), `<|im_end|>` the end of a turn."""
    spec = json.loads(_testbed_tokenizer().backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        token["content"] = QWEN_RENAMES[token["content"]]
    spec["model"]["vocab"] = {QWEN_RENAMES.get(k, k): v for k, v in spec["model"]["vocab"].items()}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False}
    return _fast_tokenizer(spec, QWEN_ADDED, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                           extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                 "vision_start_token": "<|vision_start|>",
                                                 "vision_end_token": "<|vision_end|>"})


# ------------------------------------------------------------------------------------- image processors
def clip_image_processor():
    return M.build_processor(_testbed_tokenizer()).image_processor


def llava_next_image_processor():
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                      image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                                      image_mean=M.CLIP_MEAN, image_std=M.CLIP_STD)


def onevision_image_processor():
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP},
                                           image_grid_pinpoints=ONEVISION_PINPOINTS)


def qwen_image_processor():
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)


# -------------------------------------------------------------------------------------------- configs
def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=VISION["hidden"], intermediate_size=4 * VISION["hidden"],
                            num_hidden_layers=VISION["layers"], num_attention_heads=VISION["heads"],
                            image_size=image_size, patch_size=W.PATCH, projection_dim=VISION["hidden"])


def llava_config(tokenizer):
    return M.build_config(M.TINY, tokenizer)


def llava_next_config(tokenizer):
    from transformers import LlavaNextConfig

    text = M.build_config(M.TINY, tokenizer).text_config  # the testbed's tiny Llama
    return LlavaNextConfig(
        vision_config=_clip_vision(CROP), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_seq_length=(CROP // W.PATCH) ** 2,
    )


def onevision_config(tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=VISION["hidden"], intermediate_size=4 * VISION["hidden"],
                                num_hidden_layers=VISION["layers"], num_attention_heads=VISION["heads"],
                                image_size=CROP, patch_size=W.PATCH, vision_use_head=False)
    d = M.TINY
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d.text_hidden, intermediate_size=d.text_intermediate,
        num_hidden_layers=d.text_layers, num_attention_heads=d.text_heads, num_key_value_heads=d.text_kv_heads,
        max_position_embeddings=d.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9",
    )


def _qwen_text(text_config_class, tokenizer):
    t = QWEN_TEXT
    return text_config_class(
        vocab_size=len(tokenizer), hidden_size=t["hidden"], intermediate_size=t["intermediate"],
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
        max_position_embeddings=8192, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(t["mrope_section"])},
    )


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def qwen2_vl_config(tokenizer):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(depth=VISION["layers"], embed_dim=VISION["hidden"], num_heads=VISION["heads"],
                                 mlp_ratio=4, hidden_size=QWEN_TEXT["hidden"], patch_size=W.PATCH,
                                 spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(Qwen2VLTextConfig, tokenizer),
                         **_qwen_ids(tokenizer))


def qwen2_5_vl_config(tokenizer):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    vision = Qwen2_5_VLVisionConfig(depth=VISION["layers"], hidden_size=VISION["hidden"],
                                    intermediate_size=2 * VISION["hidden"], num_heads=VISION["heads"],
                                    out_hidden_size=QWEN_TEXT["hidden"], patch_size=W.PATCH, spatial_merge_size=2,
                                    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(Qwen2_5_VLTextConfig, tokenizer),
                            **_qwen_ids(tokenizer))


# ----------------------------------------------------------------------------------------- processors
def llava_processor(tokenizer, image_processor):
    return M.build_processor(tokenizer)  # the testbed's LlavaProcessor (its own CLIP image processor)


def llava_next_processor(tokenizer, image_processor):
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=W.PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token=M.IMAGE_TOKEN, chat_template=M.CHAT_TEMPLATE)


def _qwen_video_settings() -> dict:
    return {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_VIDEO_MAX_PIXELS}


def onevision_processor(tokenizer, image_processor):
    """LlavaOnevisionProcessor, or without torchvision its stand-in (module docstring)."""
    settings = {"num_image_tokens": (CROP // W.PATCH) ** 2, "vision_feature_select_strategy": "full",
                "image_token": M.IMAGE_TOKEN, "video_token": VIDEO_TOKEN, "vision_aspect_ratio": "anyres_max_9",
                "chat_template": ONEVISION_CHAT_TEMPLATE}
    video_size = {"height": CROP, "width": CROP}
    if not torchvision_available():
        return P.OnevisionStandIn(image_processor, tokenizer, P.OnevisionFrames(size=video_size), **settings)
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionVideoProcessor

    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(size=video_size), **settings)


def _qwen_processor(real: str, stand_in, tokenizer, image_processor):
    if not torchvision_available():
        return stand_in(image_processor, tokenizer, P.QwenFrames(**_qwen_video_settings()),
                        chat_template=QWEN_CHAT_TEMPLATE)
    import transformers
    from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

    return getattr(transformers, real)(image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=Qwen2VLVideoProcessor(**_qwen_video_settings()),
                                       chat_template=QWEN_CHAT_TEMPLATE)


def qwen2_vl_processor(tokenizer, image_processor):
    """Qwen2VLProcessor, or without torchvision its stand-in (module docstring)."""
    return _qwen_processor("Qwen2VLProcessor", P.QwenVLStandIn, tokenizer, image_processor)


def qwen2_5_vl_processor(tokenizer, image_processor):
    """Qwen2_5_VLProcessor, or without torchvision its stand-in (module docstring)."""
    return _qwen_processor("Qwen2_5_VLProcessor", P.Qwen25VLStandIn, tokenizer, image_processor)


# ------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    model_class: str  # the transformers class; the family's name is its config's model_type
    image_token: str  # what a prompt holds where an image goes (the processor expands it)
    video_token: str | None  # the same for a video; None: the family takes no video
    image_tokens: int  # visual tokens for one 336x336 testbed image (the processor's count, tested)
    tokenizer: Callable[[], Any]
    image_processor: Callable[[], Any]
    config: Callable[[Any], Any]  # tokenizer -> model config
    processor: Callable[[Any, Any], Any]  # (tokenizer, image processor) -> processor
    processor_needs_torchvision: bool = False  # transformers' processor does; without it, the stand-in


KNOWN: dict[str, Family] = {
    "llava": Family("LlavaForConditionalGeneration", M.IMAGE_TOKEN, None, W.GRID ** 2,
                    llava_tokenizer, clip_image_processor, llava_config, llava_processor),
    "llava_next": Family("LlavaNextForConditionalGeneration", M.IMAGE_TOKEN, None, 192,
                         llava_tokenizer, llava_next_image_processor, llava_next_config, llava_next_processor),
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", "<|image_pad|>", "<|video_pad|>", 64,
                       qwen_tokenizer, qwen_image_processor, qwen2_vl_config, qwen2_vl_processor, True),
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", "<|image_pad|>", "<|video_pad|>", 64,
                         qwen_tokenizer, qwen_image_processor, qwen2_5_vl_config, qwen2_5_vl_processor, True),
    "llava_onevision": Family("LlavaOnevisionForConditionalGeneration", M.IMAGE_TOKEN, VIDEO_TOKEN, 192,
                              onevision_tokenizer, onevision_image_processor, onevision_config,
                              onevision_processor, True),
}


def torchvision_available() -> bool:
    """Whether transformers sees torchvision (the condition under which it has video processors)."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def uses_stand_in(family: str) -> bool:
    """Whether the family's processor here is harness.adapters.processing's stand-in (torchvision missing)."""
    return _family(family).processor_needs_torchvision and not torchvision_available()


#: The families `build()` and `save()` make (model and processor): every one, with or without torchvision.
FAMILIES: dict[str, Family] = dict(KNOWN)


class UnavailableFamily(InputError):
    """A family this module does not know."""


def _family(name: str) -> Family:
    if name not in KNOWN:
        raise UnavailableFamily(f"unknown tiny family {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def build_parts(family: str, seed: int = 0):
    """(model, tokenizer, image processor) of a family: everything but the processor, for every
    family in KNOWN (none of these needs torchvision). The model is in eval mode."""
    import torch
    import transformers

    spec = _family(family)
    tokenizer, image_processor = spec.tokenizer(), spec.image_processor()
    config = spec.config(tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer, image_processor


def build(family: str, seed: int = 0):
    """A tiny random model of the family's real class, in eval mode, and its offline processor
    (transformers', or where torchvision is missing for it, the stand-in)."""
    spec = _family(family)
    model, tokenizer, image_processor = build_parts(family, seed)
    return model, spec.processor(tokenizer, image_processor)


def save(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the family and `save_pretrained` model and processor into `folder`: a checkpoint folder."""
    model, processor = build(family, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Save a tiny random model of one family, like a checkpoint.")
    parser.add_argument("family", choices=list(KNOWN))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folder = save(args.family, args.folder, args.seed)
    except UnavailableFamily as e:
        parser.error(str(e))
    print(f"saved tiny {args.family} ({KNOWN[args.family].model_class}, seed {args.seed}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
