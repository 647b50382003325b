"""The testbed model: a small `LlavaForConditionalGeneration` of the same class as llava-hf checkpoints.

CLIP-style ViT at 336 px / patch 14 (576 patch tokens + CLS, features from the penultimate layer,
CLS dropped), a 2-layer GELU MLP projector and a Llama decoder with grouped-query attention. The
tokenizer (byte-level BPE, no unknown token), image processor and LLaVA-1.5-style chat template are
built offline and saved beside the weights, so `AutoProcessor.from_pretrained(path)` and
`LlavaForConditionalGeneration.from_pretrained(path)` load it exactly like a llava-hf checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import questions as Q
from . import world as W

# The trained testbed model shipped with the project (made by `harness testbed train`).
CHECKPOINT = Path(__file__).parent / "checkpoint"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
# HF renders templates with trim_blocks, hence the explicit {{ "\n" }}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% if message['content'] | selectattr('type', 'equalto', 'image') | list %}{{ '\n' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def format_prompt(question: str, n_images: int = 1) -> str:
    """The prompt the chat template renders for one user turn and a generation prompt."""
    images = IMAGE_TOKEN * n_images + "\n" if n_images else ""
    return f"USER: {images}{question} ASSISTANT:"


@dataclass(frozen=True)
class ModelDims:
    vision_hidden: int = 96
    vision_layers: int = 4  # the last one is unused, as in LLaVA (penultimate-layer features)
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 352
    vocab_size: int = 512  # the BPE stops at 460: every answer word is one token (tested)
    max_positions: int = 8192
    # RoPE base. Content matching (a question's colour and shape against a patch's) can only use the
    # slowly rotating key dimensions; a larger base leaves more of them (TRAINING.md, instruct_5).
    rope_theta: float = 10000.0


TINY = ModelDims(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
                 text_heads=4, text_kv_heads=2, text_intermediate=64)


def tokenizer_corpus() -> list[str]:
    """Every phrasing the testbed uses, so each template word is one token."""
    lines = []
    for family in Q.FAMILIES:
        for i in range(300):
            s = Q.make_sample("train", family, i)
            lines.append(format_prompt(s["question"], len(s["scenes"])) + " " + s["answer"] + "</s>")
    words = list(W.SHAPES) + list(W.PLURAL.values()) + list(W.COLOR_NAMES) + list(W.LETTERS)
    lines += [" ".join(words), " ".join(str(i) for i in range(10)), "yes no left right above below"]
    return lines


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # Like LLaMA's tokenizer, prepend <s> (the attention sink real LLaVA prompts start with).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=8192, padding_side="left",
    )


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": W.IMAGE_SIZE}, crop_size={"height": W.IMAGE_SIZE, "width": W.IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=W.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def build_config(dims: ModelDims, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=dims.vision_hidden, intermediate_size=4 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
        image_size=W.IMAGE_SIZE, patch_size=W.PATCH, projection_dim=dims.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads, max_position_embeddings=dims.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta},
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=W.GRID * W.GRID,
    )


def build_model(dims: ModelDims = ModelDims(), seed: int = 0):
    """A randomly initialised testbed model and its processor."""
    import torch
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(build_tokenizer(dims.vocab_size))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(dims, processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def save(model, processor, path: str | Path, dims: ModelDims | None = None) -> None:
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if dims is not None:
        (path / "testbed_dims.json").write_text(json.dumps(asdict(dims), indent=2))
