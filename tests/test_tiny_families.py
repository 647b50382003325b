"""The tiny random models of every family (harness.testbed.tiny_families) are real checkpoints.

Each buildable family, saved to a folder, reloads with AutoConfig (its model_type), AutoProcessor
and its model class, and the reloaded model answers a testbed image exactly like the one built
(same seed, same weights). Families whose processor needs torchvision (absent here) are refused
with that reason, and their model, tokenizer and image processor are still proven offline.
"""

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W

QUESTION = "What colour is the circle?"
BLOCKED = [name for name in T.KNOWN if name not in T.FAMILIES]


@pytest.fixture(scope="module")
def image():
    return W.render_pil(Q.make_sample("test", "color", 0)["scenes"][0])


@pytest.fixture(scope="module")
def frames():
    """A short video: the first scene of four samples, as PIL frames."""
    return [W.render_pil(Q.make_sample("test", "color", i)["scenes"][0]) for i in range(4)]


def _messages(kind: str = "image"):
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_family_is_known_and_named_by_its_model_type():
    assert set(T.KNOWN) == {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision"}
    assert {"llava", "llava_next"} <= set(T.FAMILIES)  # no torchvision needed
    for name in BLOCKED:
        assert T.KNOWN[name].processor_needs_torchvision and not T.torchvision_available()


@pytest.mark.parametrize("family", list(T.FAMILIES))
def test_saved_family_reloads_and_answers_alike(family, tmp_path, image):
    spec = T.FAMILIES[family]
    model, processor = T.build(family, seed=0)
    assert type(model).__name__ == spec.model_class and not model.training
    T.save(family, tmp_path, seed=0)  # built again: the same seed gives the same weights

    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == family
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor) is type(processor)
    loaded = getattr(transformers, spec.model_class).from_pretrained(tmp_path).eval()
    _same_weights(model, loaded)

    text = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    assert spec.image_token in text
    assert loaded_processor.apply_chat_template(_messages(), add_generation_prompt=True) == text
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    loaded_inputs = loaded_processor(images=[image], text=[text], return_tensors="pt")
    assert inputs.keys() == loaded_inputs.keys()
    assert all(torch.equal(inputs[k], loaded_inputs[k]) for k in inputs if isinstance(inputs[k], torch.Tensor))
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == spec.image_tokens

    out = _generate(model, inputs)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(out, _generate(loaded, loaded_inputs))


@pytest.mark.skipif("llava_onevision" not in T.FAMILIES, reason="LlavaOnevisionProcessor needs torchvision")
def test_onevision_processor_takes_a_video(tmp_path, frames):
    T.save("llava_onevision", tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    text = processor.apply_chat_template(_messages("video"), add_generation_prompt=True)
    inputs = processor(videos=[frames], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 3 * 3 + 1
    assert _generate(model, inputs).shape[1] > inputs["input_ids"].shape[1]


def test_cli_saves_a_family_and_refuses_one_it_cannot_build(tmp_path, capsys):
    assert T.main(["llava_next", str(tmp_path / "next")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "next").model_type == "llava_next"
    for name in BLOCKED:
        with pytest.raises(SystemExit) as exit_:
            T.main([name, str(tmp_path / name)])
        assert exit_.value.code == 2 and "torchvision" in capsys.readouterr().err
        with pytest.raises(T.UnavailableFamily, match="torchvision"):
            T.build(name)


# ------------------------------------------------- families whose processor needs torchvision (absent here)
def _hand_inputs(family, tokenizer, image_processor, image):
    """What the family's processor would give for one image and QUESTION, made from its parts."""
    spec = T.KNOWN[family]
    pixels = dict(image_processor(images=[image], return_tensors="pt"))
    if family.startswith("qwen"):
        n = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size ** 2
        text = (f"<|im_start|>user\n<|vision_start|>{spec.image_token * n}<|vision_end|>{QUESTION}<|im_end|>\n"
                "<|im_start|>assistant\n")
    else:  # llava_onevision: one image gets every crop, as LlavaOnevisionProcessor counts them
        n = spec.image_tokens
        text = f"USER: {spec.image_token * n}\n{QUESTION} ASSISTANT:"
    assert n == spec.image_tokens
    return {**tokenizer([text], return_tensors="pt"), **pixels}


def _video_inputs(tokenizer, frames):
    """A 4-frame video for OneVision: frames at the crop size, CLIP-normalised; 4 x 3x3 + 1 tokens."""
    mean, std = np.array(T.M.CLIP_MEAN), np.array(T.M.CLIP_STD)
    video = np.stack([(np.asarray(f.resize((T.CROP, T.CROP))) / 255.0 - mean) / std for f in frames])
    pixel_values_videos = torch.tensor(video, dtype=torch.float32).permute(0, 3, 1, 2)[None]
    text = f"USER: {T.VIDEO_TOKEN * (len(frames) * 3 * 3 + 1)}\n{QUESTION} ASSISTANT:"
    return {**tokenizer([text], return_tensors="pt"), "pixel_values_videos": pixel_values_videos}


@pytest.mark.parametrize("family", BLOCKED)
def test_model_of_a_family_without_processor_is_real_offline(family, tmp_path, image, frames):
    spec = T.KNOWN[family]
    model, tokenizer, image_processor = T.build_parts(family, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)

    assert AutoConfig.from_pretrained(tmp_path).model_type == family
    loaded = getattr(transformers, spec.model_class).from_pretrained(tmp_path).eval()
    _same_weights(model, loaded)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded_image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded_tokenizer.convert_tokens_to_ids(spec.image_token) == model.config.image_token_id

    inputs = _hand_inputs(family, tokenizer, image_processor, image)
    loaded_inputs = _hand_inputs(family, loaded_tokenizer, loaded_image_processor, image)
    out = _generate(model, inputs)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(out, _generate(loaded, loaded_inputs))
    if spec.video_token == T.VIDEO_TOKEN:
        video = _video_inputs(tokenizer, frames)
        assert torch.equal(_generate(model, video), _generate(loaded, video))
