"""The README's commands are the ones that CI and users run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fenced_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no command after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1].strip()
    assert ci == fenced_command("test-command")


def test_readme_first_command_installs_and_runs_the_demo_model():
    command = fenced_command("first-command")
    assert "'torch==2.13.0+cpu'" in command and "--model" not in command
