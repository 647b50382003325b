"""Frozen evaluation data for the testbed's lmms-eval tasks (`tasks/testbed/`).

Each question family gets `{family}_test.jsonl` and `{family}_validation.jsonl`, one sample of
`questions.make_sample(split, family, i)` a line, plus `MANIFEST.json` holding the data format
version, the counts and the sha256 of every file. The splits are disjoint by construction
(make_sample seeds on the split; the model trains on split "train").

Columns: id, family, question, answer, scenes (the scene specs as a JSON *string*, so that Arrow
does not have to infer a schema over nested optional keys), evidence (list of ints: patch indices
over the concatenated images, image i's patch p is i*576 + p) and, for color_mc, choices and
answer_index. Images are not stored: the task's doc_to_visual renders the scenes, which is a pure
function of the spec.

Generation is deterministic: regenerating gives byte-identical files. Regenerate with

    python -m harness.testbed.data            # writes tasks/testbed/data/
    python -m harness.testbed.data --verify   # only checks the checksums
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .questions import FAMILIES, make_sample

# Bump when the columns or their encoding change (not when the samples change: the checksums
# cover that).
DATA_FORMAT_VERSION = 1

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO_ROOT / "tasks"  # pass to lmms_eval TaskManager(include_path=...)
TESTBED_TASKS_DIR = TASKS_DIR / "testbed"
DATA_DIR = TESTBED_TASKS_DIR / "data"
GROUP_NAME = "testbed"
TASK_NAMES = [f"testbed_{family}" for family in FAMILIES]
SPLITS = ("test", "validation")
MANIFEST = "MANIFEST.json"
REGENERATE_HINT = "python -m harness.testbed.data"

_COLUMNS = ("id", "family", "question", "answer", "scenes", "evidence")
_MC_COLUMNS = ("choices", "answer_index")


class DataIntegrityError(RuntimeError):
    """A testbed data file is missing, or differs from the checksum in MANIFEST.json."""


def task_name(family: str) -> str:
    return f"testbed_{family}"


def data_file(family: str, split: str) -> str:
    return f"{family}_{split}.jsonl"


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def to_record(sample: dict) -> dict:
    """One make_sample dict -> one jsonl row (scenes as a JSON string, evidence as ints)."""
    record = {
        "id": sample["id"],
        "family": sample["family"],
        "question": sample["question"],
        "answer": str(sample["answer"]),
        "scenes": _dumps(sample["scenes"]),
        "evidence": [int(p) for p in sample["evidence"]],
    }
    if "choices" in sample:
        record["choices"] = [str(c) for c in sample["choices"]]
        record["answer_index"] = int(sample["answer_index"])
    return record


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_task_data(out_dir, n_test: int = 200, n_validation: int = 100,
                    families=FAMILIES) -> dict:
    """Write every family's test/validation jsonl and MANIFEST.json into out_dir; return the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"test": int(n_test), "validation": int(n_validation)}
    files = {}
    for family in families:
        for split in SPLITS:
            lines = [_dumps(to_record(make_sample(split, family, i))) + "\n" for i in range(counts[split])]
            name = data_file(family, split)
            _write_atomic(out_dir / name, "".join(lines))
            files[name] = {"rows": len(lines), "bytes": (out_dir / name).stat().st_size,
                           "sha256": _sha256(out_dir / name)}
    manifest = {
        "format_version": DATA_FORMAT_VERSION,
        "generator": "harness.testbed.questions.make_sample(split, family, index), index 0..n-1",
        "regenerate": REGENERATE_HINT,
        "families": list(families),
        "counts": counts,
        "columns": list(_COLUMNS),
        "mc_columns": {"color_mc": list(_MC_COLUMNS)},
        "files": files,
    }
    _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _regen_hint(out_dir: Path) -> str:
    out = "" if out_dir.resolve() == DATA_DIR.resolve() else f" --out {out_dir}"
    return f"regenerate with `{REGENERATE_HINT}{out}` (from the repo root, in the project venv)"


def verify(out_dir=DATA_DIR) -> dict:
    """Recompute the checksums listed in MANIFEST.json; raise DataIntegrityError naming the bad file."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise DataIntegrityError(f"testbed data manifest missing: {manifest_path}; {_regen_hint(out_dir)}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataIntegrityError(f"testbed data manifest unreadable: {manifest_path} ({e}); "
                                 f"{_regen_hint(out_dir)}") from e
    if manifest.get("format_version") != DATA_FORMAT_VERSION:
        raise DataIntegrityError(
            f"testbed data in {out_dir} has format_version {manifest.get('format_version')!r}, this code "
            f"expects {DATA_FORMAT_VERSION}; {_regen_hint(out_dir)}")
    for name, entry in sorted(files.items()):
        path = out_dir / name
        if not path.is_file():
            raise DataIntegrityError(f"testbed data file missing: {path}; {_regen_hint(out_dir)}")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise DataIntegrityError(
                f"testbed data file corrupt or modified: {path} (sha256 {digest[:12]}..., MANIFEST.json "
                f"says {entry['sha256'][:12]}...); {_regen_hint(out_dir)}")
    return manifest


@functools.lru_cache(maxsize=None)
def _verify_memo(out_dir: str, stamp: tuple) -> dict:
    return verify(out_dir)


def verify_cached(out_dir=DATA_DIR) -> dict:
    """verify(), skipped when no file in out_dir changed (size/mtime) since the last success.

    The task folder's utils.py is executed once per `!function` reference while lmms-eval loads the
    YAMLs, so it calls this rather than hashing the files dozens of times.
    """
    out_dir = Path(out_dir).resolve()
    try:
        stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(out_dir) if e.is_file()))
    except FileNotFoundError:
        stamp = ()
    return _verify_memo(str(out_dir), stamp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-validation", type=int, default=100)
    parser.add_argument("--verify", action="store_true", help="only verify the checksums")
    args = parser.parse_args(argv)
    if args.verify:
        try:
            manifest = verify(args.out)
        except DataIntegrityError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        print(f"OK: {len(manifest['files'])} files in {args.out} match MANIFEST.json")
        return 0
    t0 = time.perf_counter()
    manifest = write_task_data(args.out, args.n_test, args.n_validation)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files ({total / 1e6:.2f} MB) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
