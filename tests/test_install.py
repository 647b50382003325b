"""The install: the lock agrees with pyproject.toml, the environment check catches what differs, and
the bounds lmms-eval 0.7.3 needs but does not declare hold for installs outside the lock."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "lock.txt"


def _check_env():
    spec = importlib.util.spec_from_file_location("check_env", ROOT / "scripts" / "check_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_env = _check_env()


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    """A pyproject.toml edited without `scripts/lock.sh` fails here."""
    lock = check_env.read_lock(LOCK)
    for requirement in _declared():
        name = check_env.normalize(requirement.name)
        assert name in lock, f"{requirement} is declared but not in the lock: run scripts/lock.sh"
        assert requirement.specifier.contains(lock[name], prereleases=True), \
            f"the lock's {name}=={lock[name]} is outside {requirement}: run scripts/lock.sh"
    assert lock["torch"] == "2.13.0+cpu" and "torchvision" not in lock  # the CPU torch; see check_env.LEFT_OUT


def test_installs_outside_the_lock_exclude_the_filelock_that_broke_lmms_eval():
    """filelock 4.3 removed `filelock._api`, which lmms-eval 0.7.3 imports without bounding filelock."""
    filelock = next(r for r in _declared() if r.name == "filelock")
    assert not filelock.specifier.contains("4.3.0") and not filelock.specifier.contains("4.3.2")
    assert filelock.specifier.contains("4.2.12")


def test_every_lock_entry_carries_hashes():
    entries = LOCK.read_text().split("\n")
    pinned = [i for i, line in enumerate(entries) if check_env._LOCK_LINE.match(line)]
    for i in pinned:
        assert entries[i].endswith("\\") and entries[i + 1].strip().startswith("--hash=sha256:"), entries[i]


def test_differences_name_missing_different_and_extra_packages():
    lock = {"numpy": "2.0.0", "pandas": "2.2.0", "torch": "2.13.0+cpu"}
    env = {"numpy": "2.0.0", "pandas": "2.1.0", "ipython": "9.0", "pip": "23.2.1", "vtp-harness": "0.1.0"}
    assert check_env.differences(lock, env) == {
        "missing": ["torch==2.13.0+cpu"], "different": ["pandas 2.1.0 (lock: 2.2.0)"], "extra": ["ipython==9.0"]}
    # A user's own torch (and what it brings) stands in for the lock's.
    own = {"torch", "nvidia-cublas"}
    env = {"numpy": "2.0.0", "pandas": "2.2.0", "torch": "2.9.1+cu128", "nvidia-cublas": "12.8"}
    assert check_env.differences(lock, env, own) == {"missing": [], "different": [], "extra": []}


def test_pip_check_tolerates_only_the_left_out_torchvision():
    out = ("lmms-eval 0.7.3 requires torchvision, which is not installed.\n"
           "timm 1.0.31 requires torchvision, which is not installed.\n"
           "datasets 5.2.0 has requirement filelock>=3.0, but you have filelock 1.0.\n")
    assert check_env.pip_check_problems(out, {}) == ["datasets 5.2.0 has requirement filelock>=3.0, but you have "
                                                     "filelock 1.0."]
    assert check_env.pip_check_problems("No broken requirements found.\n", {}) == []
    # torchvision installed yet reported missing would be a real problem (a broken install).
    assert len(check_env.pip_check_problems(out, {"torchvision": "0.28.0"})) == 3


def test_the_environment_check_fails_clearly_on_a_lock_it_does_not_match(tmp_path):
    """What `.ci/run` does on an environment that is not the lock: exit 1, naming the package."""
    lock = LOCK.read_text()
    installed = check_env.installed()["filelock"]
    changed = tmp_path / "lock.txt"
    changed.write_text(lock.replace(f"\nfilelock=={installed} ", "\nfilelock==4.3.0 "))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_env.py"), "--lock", str(changed)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"1 different package(s) against lock.txt: filelock {installed} (lock: 4.3.0)" in proc.stderr
    assert "is not the lock. Rebuild it" in proc.stderr


def test_a_missing_private_module_of_lmms_eval_is_one_clear_error(monkeypatch):
    from harness.evaluation import lmms_compat

    lmms_compat.check_private_imports()  # the installed environment has them
    monkeypatch.setitem(sys.modules, "filelock._api", None)  # as under filelock 4.3: import fails
    with pytest.raises(lmms_compat.DependencyError,
                       match=r"lmms-eval 0\.7\.3 imports filelock\._api, which filelock [\d.]+ \(installed\) does "
                             r"not have: install from the lock \(make install\) or filelock<4\.3"):
        lmms_compat.check_private_imports()
