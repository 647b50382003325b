"""Check that this Python environment is the lock: exit 1 with what differs, 0 when it is.

    .venv/bin/python scripts/check_env.py [--lock constraints/lock.txt] [--allow-extra]

Compares every installed distribution with constraints/lock.txt (name and exact version; missing,
different and extra packages) and runs `pip check`. `make test` (hence CI) runs it strictly;
scripts/install.sh with --allow-extra (packages a user added are reported, not refused).

Known and accepted: torchvision, which lmms-eval and timm declare, is left out of the lock and not
installed (the registry's wheel fails to import beside the CPU torch; nothing here imports it), so
`pip check`'s "requires torchvision, which is not installed" is expected. With HARNESS_OWN_TORCH=1
(scripts/install.sh) the user's torch and everything it requires stand in for the lock's torch.

Standard library only: it must run before anything else is trusted.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "constraints" / "lock.txt"
PROJECT = "vtp-harness"
#: The installer itself: the venv brings it; the lock does not pin it.
NOT_LOCKED = ("pip",)
#: Declared by lmms-eval and timm, deliberately not installed (see the module docstring).
LEFT_OUT = ("torchvision",)
#: With HARNESS_OWN_TORCH=1, these (and what they require) are the user's, not the lock's.
OWN_TORCH = ("torch", "torchvision", "torchaudio")

_LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: exact version} of a requirements lock (`name==version \\` lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = _LOCK_LINE.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise ValueError(f"{path} pins no package: not a lock made by scripts/lock.sh")
    return pins


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees."""
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def required_closure(roots, env: dict[str, str]) -> set[str]:
    """The installed distributions `roots` require, transitively (markers ignored: an over-approximation
    that only widens what own-torch mode tolerates as the user's)."""
    seen, todo = set(), [normalize(r) for r in roots if normalize(r) in env]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            dep = normalize(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])
            if dep in env:
                todo.append(dep)
    return seen


def differences(lock: dict[str, str], env: dict[str, str], own: set[str] = frozenset()) -> dict[str, list[str]]:
    """What keeps `env` from being `lock`: missing, different and extra packages. `own`: names the
    user brought (their own torch and what it needs beyond the lock), neither required nor refused."""
    lock = {n: v for n, v in lock.items() if n not in own}
    env = {n: v for n, v in env.items() if n not in own and n != normalize(PROJECT) and n not in NOT_LOCKED}
    return {
        "missing": [f"{n}=={v}" for n, v in sorted(lock.items()) if n not in env],
        "different": [f"{n} {env[n]} (lock: {v})" for n, v in sorted(lock.items()) if n in env and env[n] != v],
        "extra": [f"{n}=={v}" for n, v in sorted(env.items()) if n not in lock],
    }


def pip_check_problems(output: str, env: dict[str, str]) -> list[str]:
    """`pip check`'s complaints, less the expected one about a left-out package that is absent."""
    problems = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        if any(line.endswith(f"requires {name}, which is not installed.") and name not in env for name in LEFT_OUT):
            continue
        problems.append(line)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--allow-extra", action="store_true",
                        help="report packages outside the lock without failing (scripts/install.sh)")
    args = parser.parse_args(argv)

    try:
        lock = read_lock(args.lock)
    except (OSError, ValueError) as err:
        print(f"check_env: cannot read the lock: {err}", file=sys.stderr)
        return 1
    env = installed()
    own = set()
    if os.environ.get("HARNESS_OWN_TORCH") == "1":  # the user's torch, and what it needs beyond the lock
        own = {n for n in required_closure(OWN_TORCH, env) if n in OWN_TORCH or n not in lock}
    diff = differences(lock, env, own)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    broken = pip_check_problems(check.stdout + check.stderr, env)

    failing = {k: v for k, v in diff.items() if v and not (k == "extra" and args.allow_extra)}
    for kind, items in diff.items():
        if items:
            level = "warning" if kind not in failing else "error"
            print(f"check_env: {level}: {len(items)} {kind} package(s) against {args.lock.name}: "
                  f"{', '.join(items)}", file=sys.stderr)
    for line in broken:
        print(f"check_env: error: pip check: {line}", file=sys.stderr)
    if failing or broken:
        print(f"check_env: this environment ({sys.prefix}) is not the lock. Rebuild it: remove it and run "
              "`make install` (or scripts/install.sh); if pyproject.toml changed, refresh the lock first "
              "with scripts/lock.sh (README: The lock).", file=sys.stderr)
        return 1
    mine = f"; the user's {', '.join(sorted(own))}" if own else ""
    print(f"check_env: the environment matches {args.lock.name} ({len(set(lock) - own)} packages{mine}), "
          "pip check clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
