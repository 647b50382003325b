"""Where a run's tasks come from, and whether their data is here.

Tasks are the testbed's (our tasks/ folder) and lmms-eval's own by name: the standard ones in
`STANDARD_TASKS` index only their folder; any other lmms-eval task or group is found by indexing the
lmms-eval folders that mention it (all of lmms-eval for a tag). Offline, a task whose Hugging Face dataset
is not in the local datasets cache stops the run before the model loads, in one line saying what to
download and how (`check_task_data`).
"""

from __future__ import annotations

from pathlib import Path

from .grid import RunError


#: Standard lmms-eval 0.7.3 tasks taken by name -> their folder under lmms_eval/tasks. Only the folders of
#: the tasks asked are indexed (milliseconds each; all of lmms-eval's ~2,000 names take 2.5 s or more).
STANDARD_TASKS = {"gqa": "gqa", "pope": "pope", "textvqa_val": "textvqa", "mme": "mme", "scienceqa_img": "scienceqa",
                  "mmbench_en_dev": "mmbench", "videomme": "videomme"}
#: Hub datasets a task's utils.py loads itself, besides its YAML's dataset_path (lmms-eval 0.7.3).
EXTRA_DATASETS = {"gqa": (("lmms-lab-encoder/GQA", "testdev_balanced_images"),)}


def lmms_eval_tasks_dir() -> Path:
    import lmms_eval.tasks

    return Path(lmms_eval.tasks.__file__).parent


def _folders_naming(root: Path, names: list[str]) -> list[Path]:
    """The task folders of lmms-eval whose YAML files (templates included) hold one of `names` as a word: a
    text scan, ~0.2 s, where indexing every one of its ~1,900 YAML files takes seconds."""
    import re

    word = re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])" for n in names))
    folders = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(word.search(f.read_text(errors="ignore")) for f in folder.rglob("*yaml*") if f.is_file()):
            folders.append(folder)
    return folders


def _all_known(manager, names) -> bool:
    """Every name, and every task of the groups and tags among them, is in the manager's index."""
    from lmms_eval.utils import load_yaml_config

    for name in names:
        if isinstance(name, dict):
            continue
        entry = manager.task_index.get(name)
        if entry is None:
            return False
        members = entry["task"] if entry["type"] == "tag" else (
            load_yaml_config(entry["yaml_path"], mode="simple").get("task") or [] if entry["type"] == "group" else [])
        if not _all_known(manager, members):
            return False
    return True


def task_manager_for(tasks: list[str], tasks_dir):
    """An lmms-eval TaskManager that knows every name in `tasks`: our folder first (our tasks win a name
    clash, lmms_compat fix 8), then the folders of the standard tasks asked, and for any other name the
    lmms-eval folders that mention it (all of lmms-eval for a tag, or a group whose tasks lie elsewhere). A
    name nobody has: a RunError listing what there is."""
    from . import lmms_compat

    root = lmms_eval_tasks_dir()
    folders = [Path(tasks_dir)] + [root / STANDARD_TASKS[t] for t in dict.fromkeys(tasks) if t in STANDARD_TASKS]
    manager = lmms_compat.task_manager(folders)
    others = [t for t in dict.fromkeys(tasks) if t not in manager.task_index]
    if others:
        extra = [f for f in _folders_naming(root, others) if f not in folders]
        if extra:
            manager = lmms_compat.task_manager(folders + extra)
            # A tag's tasks are gathered per indexed path (the first path's list wins), so a tag is only whole
            # from one index of all of lmms-eval; so is a group whose tasks lie in other folders.
            if not _all_known(manager, tasks) or any(manager.task_index.get(t, {}).get("type") == "tag"
                                                     for t in others):
                manager = lmms_compat.task_manager([Path(tasks_dir), root])
    unknown = [t for t in tasks if t not in manager.task_index]
    if unknown:
        ours = sorted(n for n in lmms_compat.task_manager(tasks_dir).all_tasks if not n.startswith("_"))
        raise RunError(f"unknown task(s) {', '.join(map(repr, unknown))}; tasks in {tasks_dir}: {', '.join(ours)}; "
                       f"standard lmms-eval tasks: {', '.join(STANDARD_TASKS)} (or any other lmms-eval "
                       f"{lmms_compat.lmms_eval_version()} task or group by its name)")
    return manager


def _task_configs(manager, names, asked=None, seen=None):
    """(name asked, its task's YAML config without functions) of every task under `names` (groups and tags
    expanded; each task under the name that was asked)."""
    from lmms_eval.utils import load_yaml_config

    seen = set() if seen is None else seen
    for name in names:
        if isinstance(name, dict):  # a task written inside a group's YAML
            yield asked or name.get("task", "?"), name
            continue
        entry = manager.task_index.get(name)
        if entry is None or name in seen:
            continue
        seen.add(name)
        if entry["type"] == "tag":
            yield from _task_configs(manager, entry["task"], asked or name, seen)
        elif entry["type"] in ("task", "group"):
            config = load_yaml_config(entry["yaml_path"], mode="simple")
            if entry["type"] == "task":
                yield asked or name, config
            else:
                yield from _task_configs(manager, config.get("task") or [], asked or name, seen)


def _dataset_cached(path: str, name: str | None, cache_dir: str, **config_kwargs) -> bool:
    """Whether `datasets` finds the dataset offline: its own lookup (the cached-builder fallback lmms-eval's
    load reaches when the hub is off), which touches no network."""
    import datasets
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity_error()  # its "using the latest cached version" warnings
    try:
        datasets.load_dataset_builder(path, name, cache_dir=cache_dir, **config_kwargs)
        return True
    except Exception:  # not cached (ConnectionError), config not cached (ValueError), unreadable cache
        return False
    finally:
        datasets_logging.set_verbosity(level)


def _videos_cached(path: str, kwargs: dict) -> bool:
    """A video task's media: unpacked under HF_HOME already, or the dataset repository in the hub cache
    (lmms-eval unpacks it from there; api/task.py ConfigurableTask.download)."""
    import os

    from huggingface_hub import snapshot_download

    hf_home = os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface/"))
    unpacked = os.path.expanduser(os.path.expandvars(str(kwargs.get("cache_dir", ""))))
    if kwargs.get("cache_dir") and os.path.exists(os.path.join(hf_home, unpacked)):
        return True
    try:
        snapshot_download(path, repo_type="dataset", revision=kwargs.get("revision", "main"), local_files_only=True)
        return True
    except Exception:  # not in the hub cache, or only partly
        return False


def video_tasks(manager, tasks: list[str]) -> list[str]:
    """The tasks asked (groups expanded to the name asked) whose documents are videos (`dataset_kwargs.video`)."""
    return list(dict.fromkeys(task for task, config in _task_configs(manager, tasks)
                              if (config.get("dataset_kwargs") or {}).get("video")))


def check_task_data(manager, tasks: list[str]) -> None:
    """Offline, every Hugging Face dataset the tasks load must be in the local cache: else one RunError line
    naming the datasets and how to get them, before the model loads (nothing computed is lost)."""
    import datasets
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir  # where lmms-eval's task loading looks

    from .model_args import is_hub_id

    if not datasets.config.HF_HUB_OFFLINE:
        return  # hub access on: lmms-eval downloads what is missing
    task_cache = _resolve_hf_datasets_cache_dir()
    default_cache = str(datasets.config.HF_DATASETS_CACHE)  # where a task's utils.py loads its own
    missing: dict[tuple, set[str]] = {}  # (path, config, cache dir, revision) -> tasks asked
    videos: dict[tuple, set[str]] = {}  # (dataset repository, revision) -> tasks asked
    for task, config in _task_configs(manager, tasks):
        path, kwargs = config.get("dataset_path"), dict(config.get("dataset_kwargs") or {})
        needs = []
        if isinstance(path, str) and is_hub_id(path) and not kwargs.get("load_from_disk"):
            needs.append((path, config.get("dataset_name"), task_cache, kwargs.get("revision"),
                          {k: kwargs[k] for k in ("data_files", "data_dir") if k in kwargs}))
            if kwargs.get("video") and not _videos_cached(path, kwargs):
                videos.setdefault((path, kwargs.get("revision", "main")), set()).add(task)
        needs += [(p, n, default_cache, None, {}) for p, n in EXTRA_DATASETS.get(task, ())]
        for p, n, cache, revision, extra in needs:
            if not _dataset_cached(p, n, cache, **extra):
                missing.setdefault((p, n, cache, revision), set()).add(task)
    if not missing and not videos:
        return
    named = sorted(set().union(*missing.values(), *videos.values()))
    parts = [f"task(s) {', '.join(named)} need Hugging Face data that is not in the local cache and hub access is off"]
    if missing:
        configs: dict[tuple, list] = {}  # (path, cache, revision) -> its configs, in order
        for p, n, c, r in missing:
            configs.setdefault((p, c, r), []).append(n)
        listed = ", ".join(dict.fromkeys(p + (f" ({', '.join(n for n in ns if n)})" if any(ns) else "")
                                         for (p, _, _), ns in configs.items()))
        calls = []
        for (p, c, r), ns in configs.items():
            where = (f", cache_dir={c!r}" if c != default_cache else "") + (f", revision={r!r}" if r else "")
            if len(ns) > 1:
                calls.append(f"[d.load_dataset({p!r}, c{where}) for c in {tuple(ns)!r}]")
            else:
                calls.append(f"d.load_dataset({p!r}" + (f", {ns[0]!r}" if ns[0] else "") + f"{where})")
        caches = sorted({c for _, _, c, _ in missing})
        parts.append(f"dataset(s) {listed}, looked for in {' and '.join(caches)}: with network access and this "
                     f"HF_HOME, run python -c \"import datasets as d; {'; '.join(calls)}\" (or copy a datasets "
                     "cache that holds them there)")
    if videos:
        gets = " and ".join(f"`hf download --repo-type dataset {p}" + (f" --revision {r}" if r != "main" else "")
                            + "`" for p, r in videos)
        parts.append(f"the videos of {', '.join(p for p, _ in videos)}: {gets} (into the hub cache of this "
                     "HF_HOME; lmms-eval unpacks them on the first run)")
    raise RunError("; ".join(parts) + "; then rerun")
