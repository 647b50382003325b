"""`harness regress`: is the current run worse than a baseline run of the same protocol?

Cells are matched by (method, budget, task). Every check is paired, because both runs evaluate the
same documents: a change is called a regression only when it is larger than what noise explains.

  accuracy      exact McNemar test on per-document correctness (baseline vs current): a regression
                when accuracy dropped and p < alpha (default 0.05).
  agreement     the same test on the per-document indicator "same answer as this run's unpruned
                reference": a regression when agreement dropped and p < alpha.
  evidence      testbed tasks: the share of the question's evidence patches kept, per document; an
                exact sign test on the per-document changes, a regression when p < alpha and the mean
                fell by more than 0.05 (a method keeping the wrong tokens shows here first: FastV
                prunes before the last of the testbed's 3 layers, so its answers barely move).
  kept tokens   mean visual tokens kept per document: a regression when it moved by more than
                0.5 token (a fixed-budget method keeps an exact count; half a token is a real change).
  FLOPs         counted, hence deterministic: any change is reported, an increase is a regression.
  latency       never compared across runs in milliseconds (another machine, another load): the
                cell's prefill_ms over the same run's unpruned prefill_ms, compared between runs; a
                ratio more than 25% worse is a warning (a regression with --strict-latency).

Exit codes: 0 no regression, 1 at least one regression, 2 unusable input (a folder, summary or
store missing, cells of the baseline missing in the current run, or a different protocol: model
weights, tasks, sample limit or task data version; the code version and packages may differ, that
is what is being tested).

Also: `--record RUN_DIR` appends a run's headline figures to `results/history.csv`, `--history`
plots them, and `--ci` runs the small protocol of `configs/regress_ci.yaml` into a fresh folder and
compares it with the committed `results/regress_baseline/` (`--write-baseline` remakes that).

Modules: `loading` (a run folder as the checks read it), `checks`, `compare` (two runs cell by cell),
`report` (the verdict table, and `regress`), `history`, `ci`.
"""

from __future__ import annotations

from .checks import (ALPHA, LATENCY_TOL, RECALL_TOL, TOKEN_TOL, Thresholds, check_accuracy, check_agreement,
                     check_flops, check_latency, check_recall, check_tokens)
from .ci import CI_CONFIG, ci, load_ci_config
from .compare import compare
from .history import HISTORY_FILE, plot_history, record
from .loading import Unusable, load_run
from .report import regress

# What the command line and callers use; the rest is in the modules.
__all__ = ["ALPHA", "CI_CONFIG", "HISTORY_FILE", "LATENCY_TOL", "RECALL_TOL", "TOKEN_TOL", "Thresholds", "Unusable",
           "check_accuracy", "check_agreement", "check_flops", "check_latency", "check_recall", "check_tokens", "ci",
           "compare", "load_ci_config", "load_run", "plot_history", "record", "regress"]
