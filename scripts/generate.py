"""Generate text for one or more prompts: ``minillama.generate_cli`` (the ``minillama-generate``
command) run from a clone, installed or not.

    python scripts/generate.py "Once upon a time" "One day, Lily found"   # the bundled demo model
    python scripts/generate.py --model meta-llama/Llama-3.1-8B "The capital of France is"
    python scripts/generate.py --help
"""
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)  # run from a clone without installing
# the processes that --tp starts run ``python -m minillama.generate_cli``: they need the clone too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from minillama import cli  # noqa: E402
from minillama.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    cli.exit_with(main())
