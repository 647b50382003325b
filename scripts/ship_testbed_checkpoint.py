"""Make a trained model the shipped testbed checkpoint, keeping its lineage.

    python scripts/ship_testbed_checkpoint.py runs/t17-model "what this run added"

Copies MODEL_DIR over harness/testbed/checkpoint. The checkpoint's current train_log.jsonl is kept as
train_log_instruct_{n}.jsonl (n: the next free number) and the lineage in training_recipe.json gains
the new run's command and the note. Then run scripts/refresh_testbed_results.sh.
"""
import json
import shutil
import sys
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent.parent / "harness" / "testbed" / "checkpoint"


def main(src: Path, note: str) -> None:
    if not (src / "training_recipe.json").is_file() or not (src / "model.safetensors").is_file():
        sys.exit(f"{src} is not a model written by `harness testbed train` (no training_recipe.json "
                 "or model.safetensors)")
    old = json.loads((CHECKPOINT / "training_recipe.json").read_text())
    lineage = old["lineage"]
    n = 1 + sum(str(run.get("log", "")).startswith("train_log_instruct_") for run in lineage)
    kept = f"train_log_instruct_{n}.jsonl"
    shutil.copy(CHECKPOINT / "train_log.jsonl", CHECKPOINT / kept)
    lineage[-1]["log"] = kept
    new = json.loads((src / "training_recipe.json").read_text())
    lineage.append({"log": "train_log.jsonl", "command": new["command"], "note": note})
    new["lineage"] = lineage
    for f in src.iterdir():
        if f.is_file() and f.name != "training_recipe.json":
            shutil.copy(f, CHECKPOINT / f.name)
    (CHECKPOINT / "training_recipe.json").write_text(json.dumps(new, indent=2))
    print(f"shipped {src}; the previous run's log is now {kept}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
