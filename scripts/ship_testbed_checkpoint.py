"""Make a trained model the shipped testbed checkpoint, keeping its lineage.

    python scripts/ship_testbed_checkpoint.py runs/t17-model "what this run added"

Copies MODEL_DIR over harness/testbed/checkpoint. The checkpoint's current train_log.jsonl is kept as
train_log_instruct_{n}.jsonl (n: the next free number), the lineage in training_recipe.json gains
the new run's command and the note, and recipe.yaml becomes the new run's recipe (what
`harness testbed train --recipe` reads). Then run scripts/refresh_testbed_results.sh.
"""
import json
import shutil
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

from harness.testbed.training import recipe as R

CHECKPOINT = Path(__file__).resolve().parent.parent / "harness" / "testbed" / "checkpoint"


def _run_name(run: dict) -> str:
    """A lineage entry as its work folder (`--workdir`), or what the entry says it was."""
    words = run.get("command", "").split()
    return words[words.index("--workdir") + 1] if "--workdir" in words else run.get("what", "?")


def write_recipe(record: dict, path: Path) -> None:
    """The recipe of the run a training_recipe.json `record` describes, as the YAML that
    `harness testbed train --recipe` reads, with a header saying what it is: the last run of a chain,
    whose earlier runs only the lineage records."""
    recipe = R.Recipe(**record["recipe"])
    lineage = record.get("lineage", [])
    fill = lambda text, indent="": textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent * 2,
                                                 break_on_hyphens=False, break_long_words=False)
    lines = fill(f"The recipe of the run that made this checkpoint, as training_recipe.json records it (\"recipe\"). "
                 f"The weights come from {len(lineage)} chained runs, each continuing the model of the one before: "
                 f"{' -> '.join(map(_run_name, lineage))}. The last one ran as")
    lines += fill(record["command"], "  ")
    if lineage and lineage[-1].get("note"):
        lines += fill(f"({lineage[-1]['note']})", "  ")
    newer = [f.name for f in fields(R.Recipe) if f.name not in record["recipe"]]
    if newer:
        lines += fill(f"Fields added to the recipe since have their defaults here: {', '.join(newer)}.")
    donor = recipe.init_from or recipe.vision_from
    if donor:
        lines += fill(f"Its donor, {donor}, is the previous run's model and is not shipped: this file repeats the "
                      f"last run from that model, not the chain.")
    lines += fill("Every run's command, note and log: training_recipe.json's \"lineage\" (its commands spell recipe "
                  "fields as flags: --foo-bar X is foo_bar: X, --rope-theta X is dims: {rope_theta: X}).")
    R.save(recipe, path, header="\n".join(lines))


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
    write_recipe(new, CHECKPOINT / "recipe.yaml")
    print(f"shipped {src}; the previous run's log is now {kept}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
