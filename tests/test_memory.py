"""Memory proportional to the message, whatever its structure (issue 14, class 3).

A message nested 63 levels deep kept a copy of itself per level: 20 MB peaked at 2.5 GB
with a banner chain.  The gate now peaks at about twice the message plus the
interpreter; the bar here is three times the message plus 100 MB, a wide margin that a
copy per level would pass by far.  Figures for 50 MB and every chain: bench/hostile.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import costly
from conftest import GATE, PLUGINS

MB = 1024 * 1024
FIXED = 100 * MB        # the interpreter, its modules, and room to spare

# Runs the gate on a file and prints its exit status and peak RSS (KiB): a process of its
# own, so no other child of the test run counts.
PROBE = """
import resource, subprocess, sys
with open(sys.argv[1], "rb") as stdin:
    done = subprocess.run(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.stderr[-300:])
"""

CHAINS = {
    "banner": ('default_filter = ["b"]\n[filter.b]\ntype = "banner"\ntext = "vertraulich"\n'
               'html = "<p>vertraulich</p>"\nsubject_prefix = "[EXTERN] "\n'),
    "packer": ('default_filter = ["zip", "unzip"]\n[filter.zip]\ntype = "packer"\ndirection = "pos"\n'
               'codec = "gzip"\n[filter.unzip]\ntype = "packer"\ndirection = "neg"\n'),
}
SHAPES = {
    "63 nested multiparts": lambda: costly.nested_multipart(63, 14 * MB),
    "30 nested message/rfc822": lambda: costly.nested_rfc822(30, 20 * MB),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chain", CHAINS)
def test_peak_memory_is_proportional_to_the_message(config_file, tmp_path, chain, shape):
    data = SHAPES[shape]()
    message = tmp_path / "message.eml"
    message.write_bytes(data)
    config = config_file(CHAINS[chain])
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ISPMAILGATE_")}
    environment["PYTHONPATH"] = str(PLUGINS)
    out = subprocess.run([sys.executable, "-c", PROBE, str(message), str(GATE), "-c", str(config), "--stdout",
                          "-f", "a@b.example", "c@d.example"], capture_output=True, text=True, env=environment,
                         timeout=300, check=True).stdout.split(" ", 2)
    code, peak = int(out[0]), int(out[1]) * 1024
    assert code == 0, out[2]
    assert peak < 3 * len(data) + FIXED, f"{chain}, {shape}: {peak // MB} MiB for {len(data) // MB} MiB"
