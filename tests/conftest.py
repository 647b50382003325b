# Shared pytest setup. Everything at module level here runs before any test module is imported,
# so it runs before lmms_eval / datasets / transformers / huggingface_hub read their environment
# (they read it once, at import). Tests are offline, and keep Hugging Face caches in a throwaway
# folder rather than ~/.cache. Others may append fixtures below.
import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_HF_TMP = tempfile.mkdtemp(prefix="vtp-tests-hf-")
os.environ["HF_HOME"] = _HF_TMP
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_TMP, "datasets")
# lmms-eval prefers this one over HF_DATASETS_CACHE (api/task.py _resolve_hf_datasets_cache_dir).
os.environ["LMMS_EVAL_DATASETS_CACHE"] = os.environ["HF_DATASETS_CACHE"]
atexit.register(shutil.rmtree, _HF_TMP, ignore_errors=True)


# ----------------------------------------------------------------------------- lmms-eval backend fixtures
import json  # noqa: E402

import pytest  # noqa: E402

TINY_MC_TASK = "vtp_tiny_mc"
TINY_GEN_TASK = "vtp_tiny_gen"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random testbed model (LlavaForConditionalGeneration + processor), saved like a checkpoint."""
    from harness.testbed import model as M

    model, processor = M.build_model(M.TINY, seed=0)
    path = tmp_path_factory.mktemp("tiny-llava")
    M.save(model, processor, path, dims=M.TINY)
    return path


@pytest.fixture(scope="session")
def tiny_tasks_dir(tmp_path_factory):
    """Two self-contained lmms-eval tasks with local data and one solid-colour image per doc:
    `vtp_tiny_mc` (multiple_choice, built-in `acc` = argmin of the losses) and `vtp_tiny_gen`
    (generate_until, built-in `exact_match`)."""
    root = tmp_path_factory.mktemp("tiny-tasks")
    folder = root / "tiny"
    folder.mkdir()
    (folder / "utils.py").write_text(
        "from PIL import Image\n\n"
        "def doc_to_visual(doc):\n"
        "    return [Image.new('RGB', (336, 336), doc['colour'])]\n")
    mc = [  # the backend test biases the model towards " blue": docs 0 and 1 are right, doc 2 wrong
        {"question": "What colour is it?", "colour": "blue", "choices": ["red", "blue", "green"], "answer_index": 1},
        {"question": "What colour is it?", "colour": "blue", "choices": ["blue", "red", "green"], "answer_index": 0},
        {"question": "What colour is it?", "colour": "green", "choices": ["green", "red", "blue"], "answer_index": 0},
    ]
    gen = [{"question": "What colour is it?", "colour": c, "answer": c} for c in ("red", "blue", "green")]
    for name, rows in (("mc.jsonl", mc), ("gen.jsonl", gen)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("dataset_path: json\ntest_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
              "doc_to_text: \"{{question}}\"\n")
    (folder / f"{TINY_MC_TASK}.yaml").write_text(
        f"task: {TINY_MC_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer_index\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / f"{TINY_GEN_TASK}.yaml").write_text(
        f"task: {TINY_GEN_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: gen.jsonl\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 3\n  do_sample: false\n  until: [\"\\n\"]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on 2 shared cores, intra-op threads cost ~10x more than they save (a module's tests run on
    one thread; `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
