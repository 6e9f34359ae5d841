"""Suites ship with the package: listed, found by name, present in the wheel's package data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

from hessbench.suite import find_suite, shipped_suites

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hessbench", *args], capture_output=True, text=True, cwd=cwd
    )


def test_every_suite_of_the_checkout_ships_with_the_package():
    assert (ROOT / "suites").resolve() == (ROOT / "hessbench" / "suites").resolve()
    names = {p.stem for p in (ROOT / "suites").glob("*.yaml")}
    assert set(shipped_suites()) == names >= {"smoke", "small_mlp", "paper_2022"}
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "suites/*.yaml" in config["tool"]["setuptools"]["package-data"]["hessbench"]


def test_a_name_finds_the_shipped_suite_and_an_existing_path_wins(tmp_path, monkeypatch):
    smoke = shipped_suites()["smoke"]
    monkeypatch.chdir(tmp_path)
    assert find_suite("smoke") == smoke
    assert find_suite("smoke.yaml") == smoke
    (tmp_path / "smoke").write_text("name: mine\n")
    assert find_suite("smoke") == Path("smoke")  # a file of that name here wins
    assert find_suite("no_such_suite") == Path("no_such_suite")
    assert find_suite("dir/smoke") == Path("dir/smoke")  # a path is never a name


def test_validate_and_run_take_a_name_outside_the_checkout(tmp_path):
    res = _cli("validate", "smoke", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "suite 'smoke'" in res.stdout
    res = _cli("run", "smoke", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "14 cells" in res.stderr
    res = _cli("validate", "no_such_suite", cwd=tmp_path)
    assert res.returncode == 2
    assert "no_such_suite" in res.stderr


def test_list_suites_names_kind_and_size(tmp_path):
    res = _cli("list", "suites", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name, size in (
        ("smoke", "14 cells"),
        ("train_digits_mlp", "runs"),
        ("rl_cartpole", "runs"),
    ):
        line = next(ln for ln in res.stdout.splitlines() if f" {name} " in ln)
        assert size in line
