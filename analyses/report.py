"""Write an analysis's markdown into its own section of analyses/README.md, leaving the other sections alone.

The analyses produce the runs the repository ships: importing this module points the results store at
`cached_runs/` (unless `$HEADLAB_RUNS` is set), which is read-only for every other caller.

A section lives between `<!-- begin NAME -->` and `<!-- end NAME -->`; a missing one is appended.
The file is replaced atomically, so an interrupted run never leaves half a README.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from headlab import store

README = Path(__file__).resolve().parent / "README.md"
os.environ.setdefault("HEADLAB_RUNS", str(store.REPO_RUNS))  # analyses write the shipped runs
HEADER = "# Analyses\n\nEach section is written by the script it names, on the embedded model, on the CPU unless it says otherwise.\n"


def write_section(name: str, markdown: str, readme: Path = README) -> Path:
    """Put `markdown` in section `name` of `readme` (created if missing)."""
    text = readme.read_text() if readme.exists() else HEADER
    block = f"<!-- begin {name} -->\n{markdown.strip()}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=readme.parent, prefix=".README.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, readme)
    return readme


class Report:
    """An analysis's markdown: each line printed as it is written, the whole put into its README section at the end.

        emit = Report("channels"); emit("## ..."); ...; emit.write()
    """

    def __init__(self, name: str):
        self.name, self.lines = name, []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self) -> Path:
        return write_section(self.name, "\n".join(self.lines))


def recompute_args(doc: str, parser=None):
    """The arguments of an analysis script: `--recompute` (ignore stored runs) plus any `parser` already holds."""
    import argparse

    parser = parser or argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--recompute", action="store_true", help="recompute runs already stored")
    return parser.parse_args()
