"""results/history.csv: one line of headline figures per recorded run, and its trend plot."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from harness.evaluation.runner import REPO_ROOT

from .loading import RunData, Unusable, load_run, protocol_hash

HISTORY_FILE = REPO_ROOT / "results" / "history.csv"
HISTORY_COLUMNS = ("recorded", "run_started", "commit", "protocol", "protocol_desc", "run", "headline")


def headline(run: RunData) -> dict:
    """Per method@budget, means over tasks: accuracy, agreement, kept tokens."""
    by_cell: dict = {}
    for (method, budget, _), values in run.metrics.items():
        by_cell.setdefault(f"{method}@{budget}", []).append(values)
    out = {}
    for cell, tasks in by_cell.items():
        out[cell] = {m: round(sum(t[m] for t in tasks) / len(tasks), 4)
                     for m in ("accuracy", "agreement", "visual_tokens_kept") if all(m in t for t in tasks)}
    return out


def record(run_dir, history=HISTORY_FILE, out=None) -> int:
    """Append one line for a finished run: commit, dates, protocol and headline figures."""
    try:
        run = load_run(run_dir)
    except Unusable as e:
        print(f"harness regress --record: unusable input: {e}", file=sys.stderr)
        return 2
    history = Path(history)
    p = run.protocol
    line = {"recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_started": run.started[:19], "commit": run.provenance.get("commit", ",".join(sorted(run.codes))),
            "protocol": protocol_hash(p),
            "protocol_desc": f"tasks={','.join(map(str, p['tasks']))} limit={p['limit']} model={p['model']}",
            "run": str(run_dir), "headline": json.dumps(headline(run), sort_keys=True)}
    new = not history.exists()
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(line)
    print(f"recorded {run_dir} ({line['commit'][:12]}, protocol {line['protocol']}) in {history}",
          file=out or sys.stdout)
    return 0


def history_frame(history=HISTORY_FILE):
    """Long table: one row per (record, method@budget, figure)."""
    import pandas as pd

    path = Path(history)
    if not path.is_file():
        raise Unusable(f"{path} does not exist (record runs with `harness regress --record RUN_DIR`)")
    rows = []
    with path.open() as f:
        for i, r in enumerate(csv.DictReader(f)):
            label = f"{i}: {r['commit'][:7]}\n{r['run_started'][:10]}"
            for cell, figures in json.loads(r["headline"]).items():
                for metric, value in figures.items():
                    rows.append({"record": i, "label": label, "protocol": r["protocol"],
                                 "protocol_desc": r["protocol_desc"], "cell": cell, "metric": metric, "value": value})
    if not rows:
        raise Unusable(f"{path} holds no records")
    return pd.DataFrame(rows)


def plot_history(history=HISTORY_FILE, output=None, out=None) -> int:
    """Mean accuracy per method@budget over the recorded runs, one panel per protocol (only runs of
    one protocol are comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    try:
        df = history_frame(history)
    except Unusable as e:
        print(f"harness regress --history: {e}", file=sys.stderr)
        return 2
    acc = df[df.metric == "accuracy"]
    protocols = list(dict.fromkeys(acc.protocol))
    fig, axes = plt.subplots(len(protocols), 1, figsize=(9, 3.6 * len(protocols)), squeeze=False)
    for ax, proto in zip(axes[:, 0], protocols):
        part = acc[acc.protocol == proto]
        sns.lineplot(data=part, x="record", y="value", hue="cell", marker="o", ax=ax)
        ticks = part.drop_duplicates("record")
        ax.set_xticks(ticks.record, ticks.label, fontsize=7)
        ax.set_ylabel("mean accuracy")
        ax.set_title(f"protocol {proto}: {part.protocol_desc.iloc[0]}", fontsize=9)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    output = Path(output) if output else Path(history).with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    print(f"wrote {output} ({acc.record.nunique()} runs, {len(protocols)} protocol(s))", file=out or sys.stdout)
    return 0
