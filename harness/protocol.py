"""The protocol: every default of a run, and the one loader of a YAML protocol file.

`harness run` with no flags runs the default protocol (the testbed group, 30 test documents per task,
budgets 192 / 128 / 64, batch 8, 5 timing repeats, seed 0). `harness run`, `harness leaderboard`
(configs/leaderboard.yaml) and `harness regress --ci` (configs/regress_ci.yaml) all read their defaults
here and their files (`harness run --config FILE`, the leaderboard's, the CI check's) through `load`,
with one set of checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.budget import DEFAULT_BUDGET_SCOPE  # how a budget applies to an image of several parts
from harness.errors import InputError
from harness.testbed.data import TASKS_DIR  # noqa: F401  (the testbed's tasks: the default tasks' folder)
from harness.testbed.model import CHECKPOINT as DEFAULT_MODEL  # noqa: F401  (the shipped testbed model)

DEFAULT_TASKS = ("testbed",)  # the testbed group: its eight tasks
DEFAULT_BUDGETS = (192, 128, 64)  # visual tokens kept per image: the literature's grid for 576
DEFAULT_LIMIT = 40  # test documents per task: as many as the protocol fits in 10 min on 2 CPU cores (README)
DEFAULT_BATCH_SIZE = 8  # answers do not depend on it (padded batches equal single runs, tested)
DEFAULT_TIMING_REPEATS = 5  # timed repeats per cell and task in the timing pass; 0 skips it
DEFAULT_DEVICE = "cpu"
#: Fixed: the random method's seed and lmms-eval's seeds; decoding is greedy.
SEED = 0
#: The keys a protocol file may hold (a file may also name the ones its command adds, e.g. `baseline`).
KEYS = ("model", "model_name", "tasks", "budgets", "limit", "seed", "methods", "timing_repeats", "batch_size",
        "device", "dtype", "budget_scope")


class ProtocolError(InputError):
    """A protocol file, or a protocol value, that cannot be run."""


@dataclass
class RunConfig:
    """One `harness run`: what the CLI flags or a protocol file say. Strings as typed (`methods`,
    `budgets`, `tasks` are comma lists); the runner validates them before any work."""

    methods: str = "none"
    budgets: str | None = None  # None: DEFAULT_BUDGETS
    tasks: str | None = None  # None: DEFAULT_TASKS
    model: str | None = None  # None: DEFAULT_MODEL
    model_name: str | None = None
    limit: float | None = DEFAULT_LIMIT  # None: every document
    output: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = DEFAULT_DEVICE
    dtype: str | None = None
    log_level: str | None = None
    timing_repeats: int = DEFAULT_TIMING_REPEATS
    budget_scope: str = DEFAULT_BUDGET_SCOPE
    params: dict = field(default_factory=dict)  # per method: {"lofi": {"center": True}}
    extra: dict = field(default_factory=dict)
    shard: str | None = None  # "I/N": this job's share of the grid (parse_shard); None: every cell. Not a protocol key


def parse_shard(text) -> tuple[int, int] | None:
    """`--shard I/N` as (I, N), I 1-based (a job array of N jobs numbered 1..N), None for no shard. Job I runs
    the unpruned reference and every N-th other cell of the grid from the I-th; a ProtocolError otherwise."""
    if text is None:
        return None
    index, sep, count = str(text).strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise ProtocolError(f"shard: expected I/N with 1 <= I <= N (this job's number, counted from 1, and the "
                            f"number of jobs), e.g. 1/4, got {text!r}")
    return i, n


def parse_limit(text) -> int | float | None:
    """Documents per task as lmms-eval takes them: an int, a float below 1 (a fraction of each task), or
    `all` (None: every document). A ProtocolError otherwise."""
    if text is None or str(text).strip().lower() == "all":
        return None
    try:
        value = float(str(text))
    except ValueError:
        raise ProtocolError(f"limit: not a number: {text!r} (a count, a fraction below 1, or all)") from None
    if not value > 0:
        raise ProtocolError(f"limit: must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def _listing(value, key: str, path: Path) -> str:
    """A YAML list or comma string as the comma string RunConfig takes."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    raise ProtocolError(f"{path}: {key} must be a list or a comma-separated string, got {value!r}")


def load(path, extra_keys: tuple[str, ...] = ()) -> tuple[RunConfig, dict]:
    """The protocol in a YAML file as a run configuration (output not set), and the values of
    `extra_keys` the command adds. Missing keys take the defaults above; unknown keys are an error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProtocolError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    accepted = KEYS + tuple(extra_keys)
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: expected a mapping of {', '.join(accepted)}")
    unknown = [k for k in data if k not in accepted]
    if unknown:
        raise ProtocolError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")
    if data.get("seed", SEED) != SEED:
        raise ProtocolError(f"{path}: seed must be {SEED}: `harness run` has fixed seeds (the random method's "
                            f"seed=0 and lmms-eval's defaults) and no option to change them yet")
    try:
        limit = parse_limit(data.get("limit", DEFAULT_LIMIT))
    except ProtocolError as e:
        raise ProtocolError(f"{path}: {e}") from None
    ints = {}
    for key, default, least in (("timing_repeats", DEFAULT_TIMING_REPEATS, 0), ("batch_size", DEFAULT_BATCH_SIZE, 1)):
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ProtocolError(f"{path}: {key} must be an integer of at least {least}, got {value!r}")
        ints[key] = value
    model = data.get("model")
    config = RunConfig(methods=_listing(data.get("methods", "all"), "methods", path),
                       budgets=_listing(data.get("budgets", list(DEFAULT_BUDGETS)), "budgets", path),
                       tasks=_listing(data.get("tasks", list(DEFAULT_TASKS)), "tasks", path),
                       model=None if model in (None, "testbed") else str(model), model_name=data.get("model_name"),
                       limit=limit, device=str(data.get("device", DEFAULT_DEVICE)), dtype=data.get("dtype"),
                       budget_scope=str(data.get("budget_scope", DEFAULT_BUDGET_SCOPE)), **ints)
    return config, {k: data[k] for k in extra_keys if k in data}
