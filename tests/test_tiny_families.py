"""The tiny random models of every family (harness.testbed.tiny_families) are real checkpoints.

Each family, saved to a folder, reloads with AutoConfig (its model_type), `load_processor` (AutoProcessor,
or where torchvision is missing for the family, harness.adapters.processing's stand-in) and its model
class, and the reloaded model answers a testbed image exactly like the one built (same seed, same
weights). tests/test_processing.py covers the stand-in itself (batches, videos, the real classes' encodings).
"""

import pytest
import torch
import transformers
from transformers import AutoConfig

from harness.adapters.processing import load_processor
from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def image():
    return W.render_pil(Q.make_sample("test", "color", 0)["scenes"][0])


def _messages(kind: str = "image"):
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": QUESTION}]}]


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_family_is_known_and_buildable():
    assert set(T.KNOWN) == {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision"}
    assert T.FAMILIES == T.KNOWN  # with or without torchvision
    for name, spec in T.KNOWN.items():
        assert T.uses_stand_in(name) == (spec.processor_needs_torchvision and not T.torchvision_available())
    assert T.KNOWN["qwen2_vl"].processor_needs_torchvision and not T.KNOWN["llava_next"].processor_needs_torchvision


@pytest.mark.parametrize("family", list(T.FAMILIES))
def test_saved_family_reloads_and_answers_alike(family, tmp_path, image):
    spec = T.FAMILIES[family]
    model, processor = T.build(family, seed=0)
    assert type(model).__name__ == spec.model_class and not model.training
    T.save(family, tmp_path, seed=0)  # built again: the same seed gives the same weights

    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == family
    loaded_processor = load_processor(str(tmp_path))
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


def test_cli_saves_a_family_and_refuses_an_unknown_one(tmp_path, capsys):
    assert T.main(["qwen2_5_vl", str(tmp_path / "qwen")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "qwen").model_type == "qwen2_5_vl"
    processor = load_processor(str(tmp_path / "qwen"))
    assert processor.image_token == "<|image_pad|>" and processor.chat_template == T.QWEN_CHAT_TEMPLATE
    with pytest.raises(SystemExit) as exit_:
        T.main(["llava_2", str(tmp_path / "other")])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(T.UnavailableFamily, match="known: llava, llava_next"):
        T.build("llava_2")


@pytest.mark.parametrize("family", list(T.KNOWN))
def test_parts_of_every_family_need_no_processor(family):
    model, tokenizer, image_processor = T.build_parts(family)
    spec = T.KNOWN[family]
    assert type(model).__name__ == spec.model_class and not model.training
    assert tokenizer.convert_tokens_to_ids(spec.image_token) == model.config.image_token_id
    assert type(image_processor).__name__.endswith("Pil")  # the PIL image processors: no torchvision needed
