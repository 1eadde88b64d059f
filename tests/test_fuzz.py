"""A short coverage-guided fuzz run of the whole pipeline (the long one: fuzz/pipeline.py)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import PROJECT


def test_short_fuzz_run_finds_nothing(tmp_path):
    # A fixed seed: the suite repeats the same exploration, so what it finds it finds on the
    # developer's machine first; new ground is the long run's (fuzz/pipeline.py, random seed).
    process = subprocess.run([sys.executable, str(PROJECT / "fuzz" / "pipeline.py"), "-runs=15000", "-seed=1",
                              "-rss_limit_mb=1024", str(tmp_path)],
                             capture_output=True, timeout=1200, check=False)
    output = process.stderr.decode("utf-8", "replace")
    assert process.returncode == 0, output[-3000:]
    done = re.search(r"\nDone (\d+) runs", output)      # libFuzzer may count one more
    assert done and int(done.group(1)) >= 15000, output[-3000:]
