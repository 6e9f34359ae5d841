"""``python -m hessbench.train run SUITE`` / ``report RUN_DIR``: train suites on their own."""

from hessbench.train.cli import app

if __name__ == "__main__":
    app(prog_name="python -m hessbench.train")
