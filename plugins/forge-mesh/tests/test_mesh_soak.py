"""10 minutes of forwarded calls at 500/s: RSS of the gateway and the function node stays flat
(grpcio has leaked on the cancel/deadline path forwarding uses: grpc/grpc#43360). Slow: FORGE_SLOW=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rss_stays_flat_under_ten_minutes_of_forwarding(tmp_path):
    out = tmp_path / "soak.json"
    seconds = float(os.environ.get("FORGE_MESH_SOAK_SECONDS", "600"))
    subprocess.run([sys.executable, str(ROOT / "bench" / "mesh" / "run.py"), "--soak", str(seconds), "--json", str(out)],
                   check=True, timeout=seconds + 300)
    res = json.loads(out.read_text())
    s = res["summary"]
    print(json.dumps(s, indent=2))
    assert res["errors"] == 0, res["errors"]
    # after the first minute (pools, caches, allocator arenas warm) neither node keeps growing
    for node in ("g", "f"):
        warm, last = s[f"{node}_after_60s_mb"], s[f"{node}_last_mb"]
        assert last <= warm * 1.15 + 5, f"{node}: RSS grew from {warm:.1f} MB after a minute to {last:.1f} MB"
