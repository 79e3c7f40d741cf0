#!/usr/bin/env python3
"""The web UI test (ui.test.mjs) against a quickstart whose vault keeps its catalog on a
real PostgreSQL 15 server: one server in a temporary directory, run as the postgres user
on a free port of 127.0.0.1 (tests/lib/osrtest.py, PgServer), a fresh database, and the
quickstart started with --db URL (OSR_WEB_TEST_DB). Exits with the browser test's code."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import osrtest  # noqa: E402


def main():
    node = os.environ.get("OSR_NODE") or "node"
    test = Path(__file__).resolve().parent / "ui.test.mjs"
    with osrtest.PgServer() as pg:
        url = pg.create_database("osr_web")
        env = dict(os.environ, OSR_WEB_TEST_DB=url)
        print(f"web UI test on PostgreSQL: {url}", flush=True)
        return subprocess.run([node, str(test)], env=env, timeout=600).returncode


if __name__ == "__main__":
    sys.exit(main())
