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
