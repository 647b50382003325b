"""Real multimodal architectures at their exact widths, for the layer-extrapolated cost model (cost_model.py).

Each `Architecture` builds a random-weight model of the real transformers class at the checkpoint's
widths and vocabulary, with as many layers as asked (the cost model builds a few and extrapolates), an
offline processor (the testbed's tokenizer, the family's own image processor at the checkpoint's
settings), and the bench's prompt: the testbed colour question about one rendered scene, resized to
the architecture's bench image. Where each number comes from is said beside it; `harness bench` prints them.

The bench image is 672x672 for every model here:
- LLaVA-NeXT: its largest square pinpoint, the one every image up to about 2:1 gets (`select_best_resolution`:
  a typical 640x480 benchmark photo too, the same 5 ViT views). Square, so nothing is unpadded:
  576 (base) + 48x48 (2x2 crops) + 48 newlines = 2928 LLM tokens, 2880 of them prunable (a 640x480
  photo: 2340).
- Qwen2-VL / 2.5-VL: a 672 px side is 24 merged tokens (28 px each), 576 visual tokens: the count of
  LLaVA-1.5 (and of LLaVA-NeXT's base view), so a budget of 192/128/64 keeps the same share (1/3, 2/9, 1/9)
  as on llava-1.5-7b and the families compare at equal retention. (At native resolution, which Qwen's
  default max_pixels of 12.8 M allows, a 640x480 photo would give 391.) 48x48 patches: 4x576 tokens through
  the ViT; Qwen2.5-VL's 112 px windows tile it into 6x6 windows of 8x8 patches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.testbed import model as M
from harness.testbed import tiny_families as TF

BENCH_IMAGE = (672, 672)  # (height, width): see the module docstring


@dataclass(frozen=True)
class Architecture:
    name: str  # the bench's model name
    checkpoint: str  # whose shape it is
    model_class: str  # the transformers class
    dims: dict  # the widths (what `config` reads); tests swap in tiny ones
    vision_layers: int  # full depth of the ViT
    text_layers: int  # full depth of the decoder
    reduced: tuple[int, int]  # (ViT, decoder) layers the cost model builds
    image: tuple[int, int]  # (height, width) of the bench's image
    vision_blocks: str  # path from the model to the ViT's layer list
    processor: Callable[[dict], Any]  # dims -> processor
    config: Callable[[dict, int, int, Any], Any]  # (dims, ViT layers, decoder layers, tokenizer) -> config
    chat: bool = False  # the prompt through the processor's chat template (else the testbed's LLaVA format)
    notes: tuple[str, ...] = field(default_factory=tuple)  # what is approximated, printed with the shape

    def build(self, vision_layers: int | None = None, text_layers: int | None = None, seed: int = 0):
        """(model, processor): random weights, eval mode, the given depths (default: the reduced ones)."""
        import transformers

        processor = self.processor(self.dims)
        vision_layers = self.reduced[0] if vision_layers is None else vision_layers
        text_layers = self.reduced[1] if text_layers is None else text_layers
        config = self.config(self.dims, vision_layers, text_layers, processor.tokenizer)
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(config).eval()
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        return model, processor

    def full_config(self, tokenizer):
        return self.config(self.dims, self.vision_layers, self.text_layers, tokenizer)

    def layer_kind(self, config, index: int) -> str:
        """What a ViT layer is, for timing one of each kind: Qwen2.5-VL's "full" or "window" attention."""
        full = getattr(config.vision_config, "fullatt_block_indexes", None)
        if full is None:
            return "layer"
        return "full" if index in set(full) else "window"

    def prompt(self, processor, batch: int = 1):
        """The bench's prompt: `batch` identical rows of the testbed colour question about one scene at `image`."""
        from harness.testbed import questions as Q
        from harness.testbed import world as W

        sample = Q.make_sample("test", "color", 0)
        height, width = self.image
        image = W.render_pil(sample["scenes"][0]).resize((width, height))
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = M.format_prompt(sample["question"])
        return processor(images=[image] * batch, text=[text] * batch, return_tensors="pt")

    def describe(self) -> str:
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"{self.name} ({self.checkpoint}, layer-extrapolated): {self.dims}, {self.vision_layers} ViT and "
                f"{self.text_layers} decoder layers, runs {self.reduced[0]} and {self.reduced[1]}; image "
                f"{self.image[0]}x{self.image[1]}{notes}")


# ------------------------------------------------------------------------------------------ LLaVA-NeXT
#: llava-hf/llava-v1.6-mistral-7b-hf: transformers' LlavaNextConfig documents this checkpoint and defaults to
#: its pinpoints (configuration_llava_next.py; LlavaNextImageProcessor's default too)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_NEXT_7B = {
    # CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336, as LLaVA-1.5): 1024 wide, MLP 4096, 16 heads
    "vision_hidden": 1024, "vision_intermediate": 4096, "vision_heads": 16, "image_size": 336, "patch_size": 14,
    # Mistral-7B-Instruct-v0.2 (the checkpoint's base LLM; MistralConfig's defaults are Mistral-7B's widths):
    # 4096 wide, 32 heads, 8 KV heads, MLP 14336; vocabulary 32064 (the llava-hf checkpoint's text_config:
    # Mistral's 32000 and the added tokens, padded to a multiple of 64)
    "text_hidden": 4096, "text_intermediate": 14336, "text_heads": 32, "text_kv_heads": 8, "vocab": 32064,
    "pinpoints": NEXT_PINPOINTS,
}


def _next_processor(dims):
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    side = dims["image_size"]
    images = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                        image_grid_pinpoints=dims["pinpoints"], image_mean=M.CLIP_MEAN,
                                        image_std=M.CLIP_STD)
    return TF.llava_next_processor(TF.llava_tokenizer(), images)


def _next_config(dims, vision_layers, text_layers, tokenizer):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=dims["vision_hidden"], intermediate_size=dims["vision_intermediate"],
                              num_hidden_layers=vision_layers, num_attention_heads=dims["vision_heads"],
                              image_size=dims["image_size"], patch_size=dims["patch_size"], projection_dim=768)
    text = MistralConfig(vocab_size=dims["vocab"], hidden_size=dims["text_hidden"],
                         intermediate_size=dims["text_intermediate"], num_hidden_layers=text_layers,
                         num_attention_heads=dims["text_heads"], num_key_value_heads=dims["text_kv_heads"],
                         sliding_window=None,  # v0.2 has none (and 2928 tokens stay under v0.1's 4096)
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text,
                           image_token_index=tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN),
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_grid_pinpoints=dims["pinpoints"],
                           image_seq_length=(dims["image_size"] // dims["patch_size"]) ** 2)


# ---------------------------------------------------------------------------------------- Qwen2(.5)-VL
#: Qwen/Qwen2-VL-7B-Instruct. ViT: Qwen2VLVisionConfig's defaults, which transformers documents as this
#: checkpoint's (configuration_qwen2_vl.py): 1280 wide, 32 layers, 16 heads, MLP ratio 4 (quick GELU),
#: patch 14, temporal patch 2, 2x2 merger into 3584. Decoder (Qwen2-7B's shape; Qwen2VLTextConfig's defaults
#: are the 72B's, so these are the checkpoint's config.json): 3584 wide, 28 layers, 28 heads, 4 KV heads,
#: MLP 18944, vocabulary 152064, M-RoPE sections [16, 24, 24] (RoPE only: no operations counted).
QWEN2_VL_7B = {
    "vision_hidden": 1280, "vision_heads": 16, "mlp_ratio": 4, "patch_size": 14,
    "text_hidden": 3584, "text_intermediate": 18944, "text_heads": 28, "text_kv_heads": 4, "vocab": 152064,
    "mrope_section": [16, 24, 24],
}
#: Qwen/Qwen2.5-VL-7B-Instruct: the same decoder. ViT (the checkpoint's config.json): 1280 wide, 32 layers,
#: 16 heads, SwiGLU MLP 3420, RMSNorm, window 112 px, full attention in layers 7, 15, 23, 31, 2x2 merger
#: into 3584. Qwen2_5_VLVisionConfig's defaults agree except hidden_size, which transformers gives as 3584
#: (the merger's output width; a 3584-wide ViT would have 224-wide heads): 1280 is the checkpoint's.
QWEN2_5_VL_7B = {**QWEN2_VL_7B, "vision_intermediate": 3420, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31]}
del QWEN2_5_VL_7B["mlp_ratio"]
#: Qwen2-VL-7B-Instruct's preprocessor_config.json pixel limits (a 672x672 image stays 672x672)
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384


def _qwen_processor(dims, which):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                      patch_size=dims["patch_size"])
    return which(TF.qwen_tokenizer(), images)


def _qwen_text(cls, dims, text_layers, tokenizer):
    return cls(vocab_size=dims["vocab"], hidden_size=dims["text_hidden"], intermediate_size=dims["text_intermediate"],
               num_hidden_layers=text_layers, num_attention_heads=dims["text_heads"],
               num_key_value_heads=dims["text_kv_heads"], bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": list(dims["mrope_section"])})


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def _qwen2_vl_config(dims, vision_layers, text_layers, tokenizer):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(depth=vision_layers, embed_dim=dims["vision_hidden"], num_heads=dims["vision_heads"],
                                 mlp_ratio=dims["mlp_ratio"], hidden_size=dims["text_hidden"],
                                 patch_size=dims["patch_size"], spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(Qwen2VLTextConfig, dims, text_layers, tokenizer),
                         tie_word_embeddings=False, **_qwen_ids(tokenizer))


def _fullatt(dims, vision_layers) -> list[int]:
    """The full-attention layers: the checkpoint's at full depth; a reduced ViT keeps one of each kind,
    the last layer full (as the checkpoint's last layer is)."""
    full = dims["fullatt_block_indexes"]
    return list(full) if vision_layers > max(full) else [vision_layers - 1]


def _qwen2_5_vl_config(dims, vision_layers, text_layers, tokenizer):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    vision = Qwen2_5_VLVisionConfig(depth=vision_layers, hidden_size=dims["vision_hidden"],
                                    intermediate_size=dims["vision_intermediate"], num_heads=dims["vision_heads"],
                                    out_hidden_size=dims["text_hidden"], patch_size=dims["patch_size"],
                                    spatial_merge_size=2, temporal_patch_size=2, window_size=dims["window_size"],
                                    fullatt_block_indexes=_fullatt(dims, vision_layers))
    text = _qwen_text(Qwen2_5_VLTextConfig, dims, text_layers, tokenizer)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_qwen_ids(tokenizer))


# ------------------------------------------------------------------------------------------- the three
ARCHITECTURES = {
    "llava-next-7b": Architecture(
        "llava-next-7b", "llava-hf/llava-v1.6-mistral-7b-hf", "LlavaNextForConditionalGeneration", LLAVA_NEXT_7B,
        vision_layers=24, text_layers=32, reduced=(2, 3), image=BENCH_IMAGE,
        vision_blocks="model.vision_tower.encoder.layers", processor=_next_processor, config=_next_config,
        notes=("prompt in the testbed's LLaVA format, not Mistral's [INST]: a few text tokens differ",)),
    "qwen2-vl-7b": Architecture(
        "qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2VLForConditionalGeneration", QWEN2_VL_7B,
        vision_layers=32, text_layers=28, reduced=(1, 3), image=BENCH_IMAGE, vision_blocks="model.visual.blocks",
        processor=lambda dims: _qwen_processor(dims, TF.qwen2_vl_processor), config=_qwen2_vl_config, chat=True),
    "qwen2.5-vl-7b": Architecture(
        "qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL_7B,
        vision_layers=32, text_layers=28, reduced=(2, 3), image=BENCH_IMAGE, vision_blocks="model.visual.blocks",
        processor=lambda dims: _qwen_processor(dims, TF.qwen2_5_vl_processor), config=_qwen2_5_vl_config,
        chat=True),
}


def tiny(name: str) -> Architecture:
    """The architecture at tiny widths and a small image (tests: the cost model's code path in seconds)."""
    arch = ARCHITECTURES[name]
    if name == "llava-next-7b":  # 84 px crops (6x6 patches), pinpoints / 4: a 168 px image is 5 views
        dims = {**arch.dims, "vision_hidden": 32, "vision_intermediate": 128, "vision_heads": 2, "image_size": 84,
                "text_hidden": 64, "text_intermediate": 128, "text_heads": 4, "text_kv_heads": 2, "vocab": 600,
                "pinpoints": [[s // 4 for s in p] for p in NEXT_PINPOINTS]}
        return dataclasses.replace(arch, dims=dims, vision_layers=3, text_layers=4, image=(168, 168))
    # 224 px: 16x16 patches, 64 merged tokens; Qwen2.5-VL's windows 2x2 of 8x8 patches
    dims = {**arch.dims, "vision_hidden": 32, "vision_heads": 2, "text_hidden": 64, "text_intermediate": 128,
            "text_heads": 4, "text_kv_heads": 2, "vocab": 600, "mrope_section": [2, 3, 3]}
    if "vision_intermediate" in dims:
        dims |= {"vision_intermediate": 64, "fullatt_block_indexes": [1, 3]}
    return dataclasses.replace(arch, dims=dims, vision_layers=4, text_layers=4, image=(224, 224))
