"""`harness regress --ci`: run the small protocol of configs/regress_ci.yaml into a fresh folder and compare
it with the committed baseline, or remake that baseline (a compact copy of a fresh run)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from harness import protocol
from harness.evaluation import store
from harness.evaluation.runner import REPO_ROOT, RunError, run
from harness.reports import run_folder

from .checks import Thresholds
from .loading import Unusable, load_run
from .report import regress

BASELINE_DIR = REPO_ROOT / "results" / "regress_baseline"
CI_CONFIG = REPO_ROOT / "configs" / "regress_ci.yaml"


def load_ci_config(path=CI_CONFIG) -> tuple[protocol.RunConfig, Path]:
    """The CI protocol, read by the one protocol loader (the checks of `harness run` and the leaderboard),
    and the baseline folder it is compared with (its `baseline` key, relative to the repository)."""
    try:
        config, extra = protocol.load(path, extra_keys=("baseline",))
    except protocol.ProtocolError as e:
        raise Unusable(str(e)) from None
    baseline = Path(extra.get("baseline") or BASELINE_DIR)
    return config, baseline if baseline.is_absolute() else REPO_ROOT / baseline


def run_ci_protocol(config: protocol.RunConfig, out_dir: Path) -> None:
    """`harness run` with the CI protocol into a fresh folder: never one holding finished cells,
    which a run would reuse instead of testing the code."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise Unusable(f"{out_dir} is not empty: the CI protocol runs into a fresh folder")
    try:
        run(dataclasses.replace(config, output=str(out_dir)))
    except RunError as e:
        raise Unusable(f"the CI protocol could not run: {e}") from None


def compact_copy(run_dir: Path, dest: Path) -> None:
    """What a committed baseline needs: summary.csv and the store without the backend's records and
    first-token distributions (the checks read correctness and answers only), a few hundred kB."""
    tmp = Path(tempfile.mkdtemp(prefix="regress-baseline-", dir=dest.parent if dest.parent.exists() else None))
    tmp.chmod(0o755)  # mkdtemp makes it private; a committed folder is not
    shutil.copy(run_dir / run_folder.SUMMARY, tmp / run_folder.SUMMARY)
    shutil.copy(run_dir / run_folder.STORE, tmp / run_folder.STORE)
    store.compact(tmp / run_folder.STORE)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def ci(config_path=CI_CONFIG, current=None, write_baseline=False, th: Thresholds | None = None, out=None) -> int:
    """Run the CI protocol and compare it with the committed baseline (or remake the baseline)."""
    out = out or sys.stdout
    try:
        config, baseline = load_ci_config(config_path)
        if not write_baseline:
            load_run(baseline)  # unusable before spending minutes on the run
        run_dir = Path(current) if current else Path(tempfile.mkdtemp(prefix="harness-regress-ci-"))
        run_ci_protocol(config, run_dir)
    except Unusable as e:
        print(f"harness regress --ci: unusable input: {e}", file=sys.stderr)
        return 2
    if write_baseline:
        compact_copy(run_dir, baseline)
        print(f"wrote the baseline {baseline} from {run_dir}", file=out)
        code = 0
    else:
        code = regress(baseline, run_dir, output=run_dir, th=th, out=out, write=current is not None)
    if current is None and code == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif code:
        print(f"kept the CI run in {run_dir}", file=out)
    return code
