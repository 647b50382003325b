"""Videos through the vtp_llava backend: frames and video files of the families that take them (tiny OneVision
and Qwen2-VL), placeholders in the document's order, prunable token counts, and one-line errors where PyAV is
missing or the family takes images only."""

import sys

import pytest

from harness.evaluation import lmms_compat

lmms_compat.apply(restore_log=False)

from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from harness.budget import tokens_to_keep  # noqa: E402
from harness.errors import InputError  # noqa: E402
from harness.evaluation import inputs  # noqa: E402
from harness.evaluation.lmms_backend import VTPLlava  # noqa: E402
from harness.testbed import tiny_families  # noqa: E402

FRAME = 84  # the tiny families' crop side: 6x6 patches of 14
#: prunable tokens of a 4-frame 84 px video, and what a budget applies to (a frame, or Qwen's 2-frame step),
#: each unit 3x3 tokens: OneVision pools each frame's 6x6 to 3x3; Qwen merges 2x2 patches of each 2-frame step.
VIDEO = {"llava_onevision": {"tokens": 4 * 9, "units": 4}, "qwen2_vl": {"tokens": 2 * 9, "units": 2}}
TOKENS_PER_UNIT = 9


def _frames(n=4, size=FRAME):
    return [Image.new("RGB", (size, size), (40 * i, 255 - 40 * i, 128)) for i in range(n)]


def _image():
    return Image.new("RGB", (336, 336), "red")


def _requests(lm, visuals: list, task="t"):
    """One generate_until request per document; `visuals[i]` is what doc i's doc_to_visual returns. The backend
    caches visuals by (task, doc): each test uses its own task name."""
    lm.task_dict = {task: {"test": [{"i": i} for i in range(len(visuals))]}}

    def doc_to_visual(doc):
        return visuals[doc["i"]]

    return [Instance("generate_until", (f"What is in doc {i}?", {"max_new_tokens": 2, "until": []}, doc_to_visual,
                                        i, task, "test"), 0, {"task": task, "doc_id": i, "repeats": 1})
            for i in range(len(visuals))]


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_vl"])
def lm(request, tmp_path_factory):
    folder = tiny_families.save(request.param, tmp_path_factory.mktemp(request.param))
    return VTPLlava(pretrained=str(folder), batch_size=2, video_frames=4)


def test_video_families_are_those_with_a_video_placeholder():
    takes = {name for name, family in tiny_families.KNOWN.items() if family.video_token}
    assert set(inputs.VIDEO_FAMILIES) == takes


def test_sample_indices_are_uniform_with_both_ends():
    assert inputs.sample_indices(12, 4) == [0, 4, 7, 11]
    assert inputs.sample_indices(3, 8) == [0, 1, 2]  # fewer frames than asked: all of them
    assert inputs.sample_indices(9, 1) == [4]
    assert inputs.parse_video_frames("32") == 32
    for bad in ("0", "-1", "many"):
        with pytest.raises(InputError, match="video_frames must be a positive integer"):
            inputs.parse_video_frames(bad)


def test_prompt_has_placeholders_in_the_document_order(lm):
    frames, image = _frames(), _image()
    video_first = lm.build_prompt("Q?", lm._load_visuals([frames, image], 0, "t"))
    image_first = lm.build_prompt("Q?", lm._load_visuals([image, frames], 0, "t"))
    assert video_first.index(lm.video_token) < video_first.index(lm.image_token)
    assert image_first.index(lm.image_token) < image_first.index(lm.video_token)
    assert lm.build_prompt("Q?", 1) == lm.build_prompt("Q?", [image])  # a count of images still works
    assert "video_frames=4" in str(lm)  # part of lmms-eval's response-cache key: it changes video inputs
    if lm.model_type == "llava_onevision":
        assert video_first == "USER: <video><image>\nQ? ASSISTANT:"


@pytest.mark.parametrize("method", ["none", "random"])
def test_videos_generate_and_count_their_prunable_tokens(lm, method):
    """A 4-frame video, an image, and both in one document, batched: the video's record counts its prunable
    tokens; the mixed document counts the image's and the video's; a method keeps its budget per frame."""
    expected = VIDEO[lm.model_type]
    reqs = _requests(lm, [[_frames()], [_image()], [_image(), _frames()]], task="gen")
    lm.configure(method, 0.5 if method != "none" else None)
    try:
        out = lm.generate_until(reqs)
    finally:
        lm.configure("none")
    assert len(out) == 3 and all(isinstance(o.text, str) and o.token_counts.output_tokens <= 2 for o in out)
    video, image, mixed = (lm.records[("gen", i, 0)] for i in range(3))
    assert video["visual_tokens_in"] == expected["tokens"]
    assert mixed["visual_tokens_in"] == image["visual_tokens_in"] + expected["tokens"]
    if method == "none":
        assert video["visual_tokens_kept"] == expected["tokens"]
    else:
        assert video["visual_tokens_kept"] == expected["units"] * tokens_to_keep(0.5, TOKENS_PER_UNIT)
        assert mixed["visual_tokens_kept"] < mixed["visual_tokens_in"]


def test_loglikelihood_scores_a_video(lm):
    reqs = _requests(lm, [[_frames()]], task="ll")
    reqs = [Instance("loglikelihood", (r.args[0], " red", *r.args[2:]), 0, r.metadata) for r in reqs]
    unpruned = lm.loglikelihood(reqs)
    lm.configure("random", 0.5)
    try:
        pruned = lm.loglikelihood(reqs)
    finally:
        lm.configure("none")
    record = lm.records[("ll", 0, 0)]
    assert record["visual_tokens_in"] == VIDEO[lm.model_type]["tokens"]
    assert record["visual_tokens_kept"] == VIDEO[lm.model_type]["units"] * tokens_to_keep(0.5, TOKENS_PER_UNIT)
    assert unpruned[0][0] > 0 and pruned[0][0] > 0 and pruned[0][0] != unpruned[0][0]


def test_a_budget_keeping_every_token_answers_as_unpruned(lm):
    reqs = _requests(lm, [[_frames()], [_image(), _frames()]], task="full")
    reference = [o.text for o in lm.generate_until(reqs)]
    lm.configure("random", 1.0)
    try:
        assert [o.text for o in lm.generate_until(reqs)] == reference
    finally:
        lm.configure("none")
    # operation counts on a video prompt: visual tokens per frame (what the budget applies to)
    lm.configure("random", 0.5)
    try:
        assert lm.flops("full")["equivalent_tokens"] == pytest.approx(tokens_to_keep(0.5, TOKENS_PER_UNIT))
    finally:
        lm.configure("none")


def _write_video(path, n=12, size=64):
    """An mpeg4 file whose frame i is grey level 20 * i."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_a_video_file_is_sampled_uniformly_and_cached(lm, tmp_path):
    pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    _write_video(path)
    reqs = _requests(lm, [[str(path)]], task="files")
    lm.generate_until(reqs)
    assert lm.records[("files", 0, 0)]["visual_tokens_in"] > 0
    frames = lm._visuals(reqs[0].args[2], 0, "files", "test")[0]
    assert inputs.is_video(frames) and len(frames) == 4 and frames[0].size == (64, 64)
    greys = [float(np.asarray(f).mean()) for f in frames]
    assert greys == pytest.approx([20 * i for i in (0, 4, 7, 11)], abs=6)  # frames 0, 4, 7, 11 of 12
    path.unlink()  # the decoded frames come from the cache now
    assert lm._visuals(reqs[0].args[2], 0, "files", "test")[0] is frames
    assert inputs.visual_bytes([frames]) == 4 * 64 * 64 * 3


def test_a_video_file_without_pyav_is_one_line_naming_the_doc(lm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(inputs.VideoReaderMissing, match=r"^videomme: .*PyAV.*: pip install av"):
        inputs.check_video_reader("videomme")
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not decoded")
    reqs = _requests(lm, [[_frames()], [str(path)]], task="nopyav")
    with pytest.raises(inputs.VideoReaderMissing) as err:
        lm.generate_until(reqs)
    message = str(err.value)
    assert "\n" not in message and message.startswith("task nopyav doc 1: ") and "pip install av" in message
    assert not any(key[0] == "nopyav" for key in lm.records)  # raised while loading, before any generation


def test_an_unreadable_or_missing_video_file_names_the_doc(lm, tmp_path):
    pytest.importorskip("av")
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(b"not a video")
    with pytest.raises(inputs.VisualInputError, match=r"^task t doc 3: cannot decode video file .*broken.mkv"):
        lm._load_visuals([str(broken)], 3, "t")
    with pytest.raises(inputs.VisualInputError, match=r"^task t doc 3: video file .*gone.mp4 does not exist"):
        lm._load_visuals([str(tmp_path / "gone.mp4")], 3, "t")
    with pytest.raises(inputs.VisualInputError, match=r"^task t doc 3, visual 0: vtp_llava cannot take int 7; acc"):
        lm._load_visuals([7], 3, "t")
    # lmms-eval's video tasks sys.exit() from doc_to_visual when a file is missing (videomme does)
    lm.task_dict = {"exits": {"test": [{"videoID": "abc"}]}}
    with pytest.raises(inputs.VisualInputError, match=r"^task exits doc 0: the task's doc_to_visual stopped: video"):
        lm._visuals(lambda doc: sys.exit(f"video path:{doc['videoID']}.mp4 does not exist"), 0, "exits", "test")


def test_an_image_only_family_given_a_video_says_which_take_video(tmp_path):
    lm = VTPLlava(pretrained=str(tiny_families.save("llava", tmp_path / "llava")))
    assert not lm.takes_video and "video_frames" not in str(lm)
    with pytest.raises(inputs.VisualInputError, match="^task videomme gives videos, but llava takes images only"):
        inputs.check_takes_video(lm.model_type, "task videomme")
    inputs.check_takes_video("llava_onevision", "task videomme")
    for video in (_frames(), str(tmp_path / "clip.mp4")):  # frames, or a file (refused before decoding)
        reqs = _requests(lm, [[_image()], [video]])
        with pytest.raises(inputs.VisualInputError,
                           match=r"^task t doc 1 gives a video, but llava takes images only; the families that "
                                 r"take videos: qwen2_vl, qwen2_5_vl, llava_onevision$"):
            lm.generate_until(reqs)
    out = lm.generate_until(_requests(lm, [[_image(), _image()]], task="images"))  # a list of images: images
    assert lm.records[("images", 0, 0)]["visual_tokens_in"] == 2 * 576 and len(out) == 1
