"""Real checkpoints and real tasks, offline: `--model` takes a folder or a hub id from the local Hugging Face
cache (the family from its config), `--tasks` takes the testbed's and lmms-eval's standard tasks by name, and
what is not here (weights, datasets) is one line saying what to download and how, before anything loads."""

import json
import os
import subprocess
import sys

import pytest

from harness import cli
from harness.evaluation import model_args
from harness.evaluation import task_sources
from harness.evaluation.model_args import MODEL_CLASSES, CheckpointError, check_pretrained

QWEN = "Qwen/Qwen2-VL-7B-Instruct"
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of this test (as HF_HUB_CACHE set at start would give)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _snapshot(cache, repo_id, files: dict):
    """A model in the hub cache's own layout (what `hf download` leaves): refs/main -> snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    folder = repo / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _run(capsys, *args):
    code = cli.main(["run", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


# ----------------------------------------------------------------------------- checkpoints

def test_the_families_are_the_real_classes():
    import transformers

    from harness.testbed import tiny_families

    assert list(MODEL_CLASSES) == FAMILIES
    for model_type, name in MODEL_CLASSES.items():
        assert model_args.model_class(model_type) is getattr(transformers, name)
        assert tiny_families.KNOWN[model_type].model_class == name  # the tiny models the tests build


def test_a_hub_id_absent_offline_is_one_line_naming_the_download(hub_cache, tmp_path, capsys):
    code, err = _run(capsys, "--model", QWEN, "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == (
        f"harness run: error: model {QWEN} is not in the local Hugging Face cache ({hub_cache}) and hub access is "
        f"off: download it with `hf download {QWEN}` (into that cache; HF_HOME or HF_HUB_CACHE point the harness at "
        f"another one), or `hf download {QWEN} --local-dir DIR` and give DIR as the model")
    assert not (tmp_path / "out").exists()


def test_the_done_when_from_a_shell_loads_nothing(tmp_path):
    """`harness run --model Qwen/Qwen2-VL-7B-Instruct` offline: exit 2, one line, before transformers or
    lmms-eval are even imported."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    script = (f"import sys; from harness import cli; code = cli.main(['run', '--model', {QWEN!r}]); "
              "print(code, *(m in sys.modules for m in ('transformers', 'lmms_eval')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"harness run: error: model {QWEN} is not in the local")
    assert f"`hf download {QWEN}`" in lines[0] and str(tmp_path / "hf" / "hub") in lines[0]


def test_a_cached_config_without_weights_is_one_line(hub_cache, tmp_path, capsys):
    folder = _snapshot(hub_cache, QWEN, {"config.json": json.dumps({"model_type": "qwen2_vl"})})
    code, err = _run(capsys, "--model", QWEN, "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == (f"harness run: error: model {QWEN} is in the local Hugging Face cache ({folder}) but no weights "
                   f"(*.safetensors): download them with `hf download {QWEN}`")
    # A sharded checkpoint with a shard missing (an interrupted download) is the same kind of line.
    (folder / "model-00001-of-00002.safetensors").write_text("x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"not all its weights: 1 of the 2 shards .*missing "
                                              r"\(model-00002-of-00002.safetensors, ...\): download them with"):
        check_pretrained(QWEN)
    # Complete: the snapshot folder is the checkpoint, labelled by the id's name.
    (folder / "model-00002-of-00002.safetensors").write_text("x")
    from harness.evaluation import runner

    assert check_pretrained(QWEN) == str(folder)
    assert runner.resolve_model(QWEN) == folder
    assert runner.model_label(folder, None) == "Qwen2-VL-7B-Instruct"


def test_no_config_in_the_cache_and_unknown_model_types(hub_cache, tmp_path, capsys):
    _snapshot(hub_cache, "org/partial", {"model.safetensors": "x"})
    with pytest.raises(CheckpointError, match="model org/partial is in the local Hugging Face cache .* without its "
                                              "config.json: download it with `hf download org/partial`"):
        check_pretrained("org/partial")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = _run(capsys, "--model", str(tmp_path / "bert"), "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == (f"harness run: error: {tmp_path / 'bert'} is a 'bert' checkpoint; the harness takes model_type "
                   "llava, llava_next, qwen2_vl, qwen2_5_vl, llava_onevision")
    _snapshot(hub_cache, "org/bert", {"config.json": json.dumps({"model_type": "bert"}), "model.safetensors": "x"})
    with pytest.raises(CheckpointError, match="org/bert is a 'bert' checkpoint; the harness takes model_type llava, "):
        check_pretrained("org/bert")


def test_paths_that_do_not_exist_stay_model_not_found(hub_cache, tmp_path):
    for missing in (str(tmp_path / "nowhere"), "./nowhere", "~/nowhere-vtp", "nowhere", "a/b/c"):
        with pytest.raises(CheckpointError, match=f"^model not found: {missing} does not exist"):
            check_pretrained(missing)
    folder = tmp_path / "empty-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match=f"checkpoint folder {folder} has a config.json but no weights"):
        check_pretrained(str(folder))


def test_the_backend_loads_the_class_of_the_config(tmp_path):
    from harness.evaluation.lmms_backend import VTPLlava
    from harness.testbed import tiny_families

    folder = tiny_families.save("llava_next", tmp_path / "tiny-next")
    lm = VTPLlava(pretrained=str(folder))
    assert lm.model_type == "llava_next" and type(lm.model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(lm.processor).__name__ == "LlavaNextProcessor"


def test_the_plugin_answers_to_its_name_and_its_alias():
    from lmms_eval import models

    from harness.evaluation.lmms_backend import VTPLlava

    assert models.get_model("vtp_llava") is VTPLlava
    assert models.get_model("vtp") is VTPLlava
    assert models.get_model("vtp", force_simple=True) is VTPLlava


# ----------------------------------------------------------------------------- tasks

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """An empty datasets cache of this test, where lmms-eval's task loading and `datasets` both look."""
    import datasets
    import lmms_eval.api.task

    cache = tmp_path / "datasets"
    cache.mkdir()
    monkeypatch.setattr(lmms_eval.api.task, "_resolve_hf_datasets_cache_dir", lambda: str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _cache_dataset(cache, repo_id, config, tmp_path):
    """What an online `datasets.load_dataset(repo_id, config)` leaves in the cache: the prepared arrow files
    under `<org>___<name>/<config>/<version>/<hash>/`."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    source = tmp_path / f"{config}.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), source)
    name = camelcase_to_snakecase(repo_id.split("/")[1])
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name=name, config_name=config,
                      data_files={"test": str(source)}, hash="feed")
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / f"{repo_id.split('/')[0]}___{name}" / config / "0.0.0" / "feed")


def test_standard_tasks_resolve_indexing_only_their_folders():
    from harness.testbed.data import TASKS_DIR

    manager = task_sources.task_manager_for(["gqa", "pope", "mme", "testbed_exist"], TASKS_DIR)
    index = manager.task_index
    assert {"gqa", "pope", "mme", "testbed_exist", "testbed"} <= set(index)
    assert "ai2d" not in index and "textvqa_val" not in index  # folders not asked for are not read
    assert index["gqa"]["yaml_path"].endswith("lmms_eval/tasks/gqa/gqa.yaml")
    manager = task_sources.task_manager_for(list(task_sources.STANDARD_TASKS), TASKS_DIR)
    assert set(task_sources.STANDARD_TASKS) <= set(manager.task_index)
    assert {"textvqa_val", "scienceqa_img", "mmbench_en_dev", "videomme"} <= set(task_sources.STANDARD_TASKS)


def test_standard_tasks_without_their_data_stop_before_the_model_loads(tiny_llava_dir, datasets_cache, tmp_path,
                                                                       capsys, monkeypatch):
    from harness.evaluation.lmms_backend import VTPLlava

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(VTPLlava, "__init__", no_model)
    code, err = _run(capsys, "--tasks", "gqa,pope,mme", "--model", str(tiny_llava_dir),
                     "--output", str(tmp_path / "out"))
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err == (
        "harness run: error: task(s) gqa, mme, pope need Hugging Face data that is not in the local cache and hub "
        "access is off; dataset(s) lmms-lab-encoder/GQA (testdev_balanced_instructions, testdev_balanced_images), "
        f"lmms-lab-encoder/POPE, lmms-lab-encoder/MME, looked for in {datasets_cache}: with network access and this "
        "HF_HOME, run python -c \"import datasets as d; [d.load_dataset('lmms-lab-encoder/GQA', c) for c in "
        "('testdev_balanced_instructions', 'testdev_balanced_images')]; d.load_dataset('lmms-lab-encoder/POPE'); "
        "d.load_dataset('lmms-lab-encoder/MME')\" (or copy a datasets cache that holds them there); then rerun")
    assert not (tmp_path / "out").exists()


def test_data_in_the_cache_is_found_and_only_what_is_missing_is_named(datasets_cache, tmp_path):
    from harness.testbed.data import TASKS_DIR

    manager = task_sources.task_manager_for(["pope", "gqa", "testbed"], TASKS_DIR)
    _cache_dataset(datasets_cache, "lmms-lab-encoder/POPE", "default", tmp_path)
    task_sources.check_task_data(manager, ["pope", "testbed"])  # POPE is here; the testbed's data is local
    _cache_dataset(datasets_cache, "lmms-lab-encoder/GQA", "testdev_balanced_instructions", tmp_path)
    with pytest.raises(task_sources.RunError, match=r"^task\(s\) gqa need .* dataset\(s\) lmms-lab-encoder/GQA "
                                            r"\(testdev_balanced_images\), looked for"):
        task_sources.check_task_data(manager, ["pope", "gqa"])
    _cache_dataset(datasets_cache, "lmms-lab-encoder/GQA", "testdev_balanced_images", tmp_path)
    task_sources.check_task_data(manager, ["pope", "gqa"])


def test_a_video_task_also_names_its_videos(datasets_cache, tmp_path, monkeypatch):
    from harness.testbed.data import TASKS_DIR

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    manager = task_sources.task_manager_for(["videomme"], TASKS_DIR)
    with pytest.raises(task_sources.RunError) as info:
        task_sources.check_task_data(manager, ["videomme"])
    assert "d.load_dataset('lmms-eval/Video-MME')" in str(info.value)
    assert "the videos of lmms-eval/Video-MME: `hf download --repo-type dataset lmms-eval/Video-MME`" in str(info.value)
    _cache_dataset(datasets_cache, "lmms-eval/Video-MME", "default", tmp_path)
    (tmp_path / "hf" / "videomme").mkdir(parents=True)  # unpacked by an earlier run
    task_sources.check_task_data(manager, ["videomme"])


def test_unknown_tasks_list_ours_and_the_standard_ones_and_any_lmms_eval_task_resolves(tiny_llava_dir, tmp_path,
                                                                                      capsys):
    from harness.testbed.data import TASKS_DIR

    code, err = _run(capsys, "--tasks", "gqa,nope_task", "--model", str(tiny_llava_dir),
                     "--output", str(tmp_path / "out"))
    assert code == 2 and "\n" not in err
    assert err.startswith(f"harness run: error: unknown task(s) 'nope_task'; tasks in {TASKS_DIR}: testbed, ")
    assert err.endswith("; standard lmms-eval tasks: gqa, pope, textvqa_val, mme, scienceqa_img, mmbench_en_dev, "
                        "videomme (or any other lmms-eval 0.7.3 task or group by its name)")
    # Any other lmms-eval task by its name: only the folders whose YAML names it are indexed.
    manager = task_sources.task_manager_for(["ai2d", "testbed_exist"], TASKS_DIR)
    assert "ai2d" in manager.task_index and "testbed_exist" in manager.task_index and "gqa" not in manager.task_index
    assert manager.task_index["ai2d"]["yaml_path"].endswith("lmms_eval/tasks/ai2d/ai2d.yaml")
