"""The README's Probes section is a doctest: every snippet in it runs as written
(``pytest README.md`` runs the whole file the same way)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def probes_section() -> str:
    (section,) = re.findall(r"\n## Probes\n(.*?)(?=\n## )", README.read_text(), re.S)
    return section


def test_the_probes_section_runs_as_a_doctest() -> None:
    text = probes_section()
    test = doctest.DocTestParser().get_doctest(
        text, {}, "README.md, Probes", str(README), 0
    )
    assert len(test.examples) >= 20  # the section is made of runnable examples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small nets: one thread is faster on a busy machine
    try:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
    finally:
        torch.set_num_threads(threads)
    assert runner.failures == 0
    assert "from optiscope.probes import" in text
