"""scripts/bench_serve.py end to end on the demo model (CPU, tiny lengths): it starts the server,
drives it, compares with static batching and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent


def bench_serve(tmp_path, *args) -> dict:
    """The JSON of bench_serve.py run on the demo model with tiny prompts and outputs and ``args``."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--model", str(ROOT / "minillama" / "demo_model"),
         "--prompt-lens", "4,12", "--output-lens", "4,12", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_serve_runs_on_the_demo_model(tmp_path):
    results = bench_serve(tmp_path, "--concurrency", "1,3", "--requests-per-client", "1", "--max-batch", "4")
    for level, n in (("1", 1), ("3", 3)):
        static, served = results["levels"][level]["static"], results["levels"][level]["continuous"]
        assert static["requests"] == served["requests"] == n
        # ignore_eos: every request generates its max_tokens, served as in the baseline
        assert served["tokens"] == static["tokens"] > 0 and served["tok_s"] > 0 and served["ttft_p50_ms"] > 0
        assert 0 < served["all_busy_s"] <= served["wall_s"] and served["tok_s_all_busy"] > 0
    solo = results["levels"]["1"]["continuous"]  # one client is busy until its last token
    assert solo["tok_s_all_busy"] == pytest.approx(solo["tokens"] / solo["all_busy_s"])
    # its steady window runs from its first token to its last: every chunk lies in it
    assert 0 < solo["steady_s"] < solo["all_busy_s"]
    assert solo["tok_s_steady"] == pytest.approx(solo["tokens"] / solo["steady_s"])
    assert results["server_stats"]["failed"] == 0 and results["server_stats"]["running"] == 0


@pytest.mark.slow
def test_bench_serve_shared_queue_serves_every_request_once(tmp_path):
    """--queue shared: 3 clients take 3 x 2 requests from one queue; no static baseline."""
    results = bench_serve(tmp_path, "--concurrency", "3", "--requests-per-client", "2", "--queue", "shared",
                          "--no-static")
    served = results["levels"]["3"]["continuous"]
    assert served["queue"] == "shared" and served["requests"] == 6 and served["tokens"] > 0
    assert 0 < served["all_busy_s"] <= served["wall_s"]


@pytest.mark.slow
def test_bench_serve_score_sends_log_likelihood_requests(tmp_path):
    """--score: 2 clients x 2 requests of echo + logprobs + max_tokens 0; their tokens are the prompt
    tokens the server scored."""
    results = bench_serve(tmp_path, "--concurrency", "2", "--requests-per-client", "2", "--score", "--max-batch", "2")
    served = results["levels"]["2"]["continuous"]
    assert "static" not in results["levels"]["2"]
    assert served["requests"] == 4 and served["tok_s"] > 0 and served["ttft_p50_ms"] > 0
    assert 4 * 4 <= served["tokens"] <= 4 * (12 + 1)  # prompts of 4-12 ids, maybe a BOS each
    assert results["server_stats"]["failed"] == 0
