"""harness.adapters.processing: the processor of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision where transformers
cannot build theirs (no torchvision here), used exactly then, and giving what the real one gives.

Each family's tiny checkpoint (harness.testbed.tiny_families) is saved, reloaded through `load_processor`
and run: batches of images of different sizes, left padded, hold as many placeholder tokens as the model
has image features for each image; encodings equal those of transformers' own processor classes (built
here around a dummy video processor, which their image path never touches); videos run through the model.
"""

import json

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from harness.adapters import processing as P
from harness.errors import InputError
from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W

STAND_IN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
pytestmark = pytest.mark.skipif(not P.torchvision_missing(), reason="the stand-in is used only without torchvision")
QUESTION = "What colour is the circle?"
SIZES = [(336, 336), (224, 336), (336, 168)]  # PIL (width, height): square, tall, wide


@pytest.fixture(scope="module")
def image():
    return W.render_pil(Q.make_sample("test", "color", 0)["scenes"][0])


@pytest.fixture(scope="module")
def frames():
    return [W.render_pil(Q.make_sample("test", "color", i)["scenes"][0]) for i in range(4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder, model, processor) of the saved tiny checkpoint, loaded back."""
    out = {}
    for family in STAND_IN_FAMILIES:
        folder = T.save(family, tmp_path_factory.mktemp(family), seed=0)
        model = getattr(transformers, T.KNOWN[family].model_class).from_pretrained(folder).eval()
        out[family] = folder, model, P.load_processor(str(folder))
    return out


def _prompt(processor, kind="image"):
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _batch(processor, image):
    text = _prompt(processor)
    texts = [text, text.replace(QUESTION, "Which shape is left of the square?"), text]
    images = [image.resize(size) for size in SIZES]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


def _feature_counts(model, inputs) -> list[int]:
    """Image features per image, as the model computes them (not from the processor's arithmetic)."""
    with torch.no_grad():
        if "image_grid_thw" in inputs:
            out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            out = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                           batch_num_images=inputs["batch_num_images"])
    return [len(f) for f in out.pooler_output]


# ------------------------------------------------------------------------------------------ loading
def test_load_processor_stands_in_exactly_where_torchvision_is_missing(saved, tmp_path, monkeypatch):
    classes = {"qwen2_vl": P.QwenVLStandIn, "qwen2_5_vl": P.Qwen25VLStandIn, "llava_onevision": P.OnevisionStandIn}
    for family, (_, _, processor) in saved.items():
        assert type(processor) is classes[family]
    T.save("llava_next", tmp_path / "next")  # a family whose processor needs no torchvision: transformers' own
    assert type(P.load_processor(str(tmp_path / "next"))) is transformers.LlavaNextProcessor
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Unrecognized processing class"):  # not a checkpoint: transformers' error
        P.load_processor(str(tmp_path / "empty"))
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    with pytest.raises(ImportError, match="[Tt]orchvision"):  # torchvision "there": the failure is not ours
        P.load_processor(str(saved["qwen2_vl"][0]))


@pytest.mark.parametrize("family", STAND_IN_FAMILIES)
def test_saved_files_are_the_real_processors(family, saved):
    folder, model, processor = saved[family]
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["processor_class"] == P.STAND_INS[family].processor_class
    assert config["image_processor"]["image_processor_type"].startswith(type(processor.image_processor).__name__[:-3])
    assert config["video_processor"]["video_processor_type"] == type(processor.video_processor).processor_type
    assert (folder / "chat_template.jinja").read_text() == processor.chat_template
    assert processor.image_token_id == model.config.image_token_id
    assert processor.video_token_id == model.config.video_token_id


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("family", STAND_IN_FAMILIES)
def test_batch_of_images_of_different_sizes_fits_the_model(family, saved, image):
    _, model, processor = saved[family]
    inputs = _batch(processor, image)
    ids = inputs["input_ids"]
    assert (inputs["attention_mask"][:, 0] == 0).any() and (inputs["attention_mask"][:, -1] == 1).all()  # left pad
    per_row = (ids == model.config.image_token_id).sum(-1).tolist()
    assert per_row == _feature_counts(model, inputs)
    assert len(set(per_row)) == 3  # the three sizes take three different counts
    if family.startswith("qwen"):
        assert torch.equal(inputs["mm_token_type_ids"], (ids == model.config.image_token_id).long())
        assert per_row[0] == T.KNOWN[family].image_tokens
    else:
        assert "mm_token_type_ids" not in inputs and inputs["batch_num_images"].tolist() == [1, 1, 1]

    built_model, built_processor = T.build(family, seed=0)  # the same seed, in memory: same inputs and answers
    built = _batch(built_processor, image)
    assert built.keys() == inputs.keys() and all(torch.equal(built[k], inputs[k]) for k in inputs)
    out = _generate(model, inputs)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out, _generate(built_model, built))


def _real_processor(family, processor, monkeypatch):
    """transformers' own processor class around the same parts; its video processor slot holds a dummy
    (its type check, which needs torchvision, skipped), which the image path never uses."""
    cls = getattr(transformers, P.STAND_INS[family].processor_class)
    check = cls.check_argument_for_proper_class
    monkeypatch.setattr(cls, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    return cls(image_processor=processor.image_processor, tokenizer=processor.tokenizer, video_processor=object(),
               chat_template=processor.chat_template, **processor._settings())


@pytest.mark.parametrize("family", STAND_IN_FAMILIES)
def test_encodes_images_exactly_as_transformers_processor(family, saved, image, monkeypatch):
    _, _, processor = saved[family]
    real = _real_processor(family, processor, monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert real.apply_chat_template(messages, add_generation_prompt=True) == _prompt(processor)
    ours, theirs = _batch(processor, image), _batch(real, image)
    assert list(ours.keys()) == list(theirs.keys())
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    single = processor(text=[_prompt(processor)], images=[image], return_tensors="pt")
    reference = real(text=[_prompt(processor)], images=[image], return_tensors="pt")
    assert all(torch.equal(single[k], reference[k]) for k in reference)
    messages[0]["content"][0]["image"] = image  # the image in the message, encoded by apply_chat_template
    ours, theirs = (p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt") for p in (processor, real))
    assert list(ours.keys()) == list(theirs.keys()) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_onevision_counts_follow_transformers_arithmetic(saved, image, monkeypatch):
    """Token counts over many sizes and anyres limits, against LlavaOnevisionProcessor's own arithmetic; and
    with anyres_max_1 (the grid pooled down) against the model's features."""
    _, model, processor = saved["llava_onevision"]
    real = _real_processor("llava_onevision", processor, monkeypatch)
    for limit in ("anyres_max_1", "anyres_max_2", "anyres_max_9"):
        processor.vision_aspect_ratio = real.vision_aspect_ratio = limit
        for h in range(20, 700, 37):
            for w in range(20, 700, 41):
                assert processor.image_tokens(h, w, 84, 84) == real._get_number_of_features(h, w, 84, 84), (limit, h, w)
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"
    try:
        inputs = _batch(processor, image)
        per_row = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        assert per_row == _feature_counts(model, inputs) and per_row[0] < T.KNOWN["llava_onevision"].image_tokens
    finally:
        model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_9"


def test_placeholders_and_media_must_agree(saved, image):
    _, _, processor = saved["qwen2_vl"]
    with pytest.raises(InputError, match="1 <|image_pad|> placeholders but 2 images"):
        processor(text=[_prompt(processor)], images=[image, image], return_tensors="pt")
    with pytest.raises(InputError, match="video"):
        processor(text=[_prompt(processor, "video")], return_tensors="pt")


# ------------------------------------------------------------------------------------------ videos
@pytest.mark.parametrize("family, n_frames, tokens", [
    ("llava_onevision", 4, 4 * 3 * 3 + 1),  # frames x 2x2-pooled 6x6 crop + one newline
    ("qwen2_vl", 4, 2 * 8 * 8 // 4),  # 112x112 frames: 8x8 patches, 2 temporal patches, 2x2 merge
    ("qwen2_5_vl", 3, 2 * 8 * 8 // 4),  # an odd count: the last frame repeated to fill the temporal patch
])
def test_video_runs_through_the_model(family, n_frames, tokens, saved, frames):
    _, model, processor = saved[family]
    inputs = processor(text=[_prompt(processor, "video")], videos=[frames[:n_frames]], return_tensors="pt")
    video = inputs["input_ids"] == model.config.video_token_id
    assert int(video.sum()) == tokens
    if family.startswith("qwen"):
        assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
        assert torch.equal(inputs["mm_token_type_ids"], 2 * video.long())
    else:
        assert inputs["pixel_values_videos"].shape == (1, n_frames, 3, T.CROP, T.CROP)
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])  # 24 fps without metadata
    assert _generate(model, inputs).shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", STAND_IN_FAMILIES)
def test_video_frames_are_processed_like_images(family, saved, image):
    """A still video: its frame's pixels are the image processor's for the same image at the same size."""
    _, _, processor = saved[family]
    pixels = processor.image_processor([image], return_tensors="pt")
    if family.startswith("qwen"):  # two identical frames are one image's temporal patch
        size = processor.image_processor.size
        frames = P.QwenFrames(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        video = frames([[image, image]], return_tensors="pt")
        assert torch.equal(video["video_grid_thw"], pixels["image_grid_thw"])
        torch.testing.assert_close(video["pixel_values_videos"], pixels["pixel_values"])
    else:  # a frame is the image's base view (resized whole to the crop size)
        video = processor.video_processor([[image]], return_tensors="pt")
        torch.testing.assert_close(video["pixel_values_videos"][0, 0], pixels["pixel_values"][0, 0])


# ------------------------------------------------------------------------------------------ other folders
def test_a_folder_without_processor_config_loads_from_its_parts(saved, tmp_path, image):
    """A checkpoint saved the older way (tokenizer, preprocessor_config.json, chat_template.json): OneVision's
    settings come from the model config, Qwen's video limits from the image processor's file (as transformers
    reads them)."""
    for family in ("llava_onevision", "qwen2_vl"):
        folder, model, processor = saved[family]
        old = tmp_path / family
        model.config.save_pretrained(old)
        AutoTokenizer.from_pretrained(folder).save_pretrained(old)
        processor.image_processor.save_pretrained(old)
        (old / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
        assert AutoConfig.from_pretrained(old).model_type == family
        loaded = P.load_processor(str(old))
        assert loaded._settings() == processor._settings() and loaded.chat_template == processor.chat_template
        a, b = _batch(loaded, image), _batch(processor, image)
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert loaded.video_processor.size == processor.image_processor.size
