"""Provenance: a checkout records its commit, an installed copy its version only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import hessbench
from hessbench.report.page import hessbench_provenance
from hessbench.store.provenance import checkout, environment, source

PACKAGE = Path(hessbench.__file__).parent


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def user_repo(tmp_path: Path, name: str = "myproject") -> Path:
    """A user's own git repository with hessbench installed into a venv inside it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    git(repo, "init", "-q")
    git(repo, "add", "pyproject.toml")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "user code")
    return repo


def test_the_checkout_records_its_commit():
    root = PACKAGE.parent
    assert checkout() == root.resolve()
    info = source()
    assert info["hessbench_source"] == "checkout"
    assert info["git_commit"] == git(root, "rev-parse", "HEAD")
    assert isinstance(info["git_dirty"], bool)
    assert environment()["hessbench_source"] == "checkout"


def test_an_installed_copy_inside_another_repo_records_no_commit(tmp_path):
    repo = user_repo(tmp_path)
    site = repo / ".venv" / "lib" / "python3" / "site-packages" / "hessbench"
    shutil.copytree(PACKAGE, site, ignore=shutil.ignore_patterns("__pycache__"))
    assert checkout(site) is None
    info = source(site)
    assert info["hessbench_source"] == "installed"
    assert info["git_commit"] is None  # not the user's commit
    assert info["git_dirty"] is None
    assert info["hessbench_version"] == hessbench.__version__


def test_a_hessbench_folder_at_the_top_of_another_project_is_not_a_checkout(tmp_path):
    repo = user_repo(tmp_path)
    pkg = repo / "hessbench"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert source(pkg)["hessbench_source"] == "installed"
    # the same layout in a hessbench project is a checkout
    (repo / "pyproject.toml").write_text('[project]\nname = "hessbench"\n')
    info = source(pkg)
    assert info["hessbench_source"] == "checkout"
    assert info["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert info["git_dirty"] is True  # pyproject.toml changed


def test_reports_show_what_was_recorded():
    old = {"hessbench_version": "0.1.0", "git_commit": "0123456789abcdef", "git_dirty": True}
    assert hessbench_provenance(old) == "0.1.0, git commit 0123456789ab with uncommitted changes"
    new = {**old, "hessbench_source": "checkout", "git_dirty": False}
    assert hessbench_provenance(new) == "0.1.0, git commit 0123456789ab"
    installed = {
        "hessbench_version": "0.1.0",
        "hessbench_source": "installed",
        "hessbench_distribution": "0.1.0",
        "git_commit": None,
    }
    assert hessbench_provenance(installed) == "0.1.0, installed package (distribution 0.1.0)"
