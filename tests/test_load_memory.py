"""Loading streams tensors from memory-mapped shards: no second host copy of the model."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_peak_host_memory_is_model_plus_one_shard(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_load.py"), "--gb", "0.4", "--shards", "4",
         "--hidden", "1024", "--dir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # On the CPU the loaded model itself lives in host memory; the loader may add about one shard
    # (the memory-mapped file being copied) and small temporaries, never a second model copy.
    slack = 48 * 2**20
    assert r["load_peak_increase"] <= r["model_bytes"] + r["largest_shard_bytes"] + slack, r
    assert r["load_peak_increase"] < 1.6 * r["model_bytes"], r
