"""Generate text for one or more prompts: ``minillama.generate_cli`` (the ``minillama-generate``
command) run from a clone, installed or not.

    python scripts/generate.py "Once upon a time" "One day, Lily found"   # the bundled demo model
    python scripts/generate.py --model meta-llama/Llama-3.1-8B "The capital of France is"
    python scripts/generate.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from minillama.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
