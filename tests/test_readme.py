"""The README's two commands are the ones that work: CI runs the test command, the start command is real."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_commands_match_ci_and_the_project():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    start, tests = blocks[0], blocks[1]
    assert start == ("pip install torch==2.14.1 torchvision==0.29.1 && pip install -r requirements.txt "
                     "&& python app.py")
    assert (ROOT / "app.py").is_file() and (ROOT / "requirements.txt").is_file()
    assert tests == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pip install --quiet torch==2.14.1 torchvision==0.29.1" in ci
    assert ci.strip().splitlines()[-1] == "python -m pytest -q"
    assert "`python -m pytest -q`" in readme


def test_torch_is_pinned_everywhere():
    for name in ("requirements.txt", "pyproject.toml"):
        text = (ROOT / name).read_text()
        assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
