"""The README's example runs as written."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_runs() -> None:
    (example,) = re.findall(r"## Example\n\n```python\n(.*?)```", README, re.S)
    exec(compile(example, "README.md", "exec"), {})
