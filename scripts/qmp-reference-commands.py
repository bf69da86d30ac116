#!/usr/bin/env python3
"""List every QMP command named in QEMU's reference documents, one per line, sorted.

The documents (../shared/qmp-reference/ by default) come in three shapes, and a command can
be named in four ways; the script takes all four and reports which source named what:

  * ``.name = "X"`` entries of the dispatch tables in the ``.hx`` files;
  * section headings, a command name underlined with dashes (``query-status`` over
    ``------------``); a leading ``@`` (a typo in the 2.x file) is dropped, and headings that
    are prose ("QMP Supported Commands", "Show rocker switch") are not names;
  * ``"execute": "X"`` in the examples, which is how the sections with prose headings name
    their command;
  * ``(QEMU) X ...`` qmp-shell lines in the introduction.

Event names (``"event": "X"``) and argument names (``- "name": ...``) are never taken.

Usage: scripts/qmp-reference-commands.py [REFERENCE_DIR] [--sources]
  --sources  print, for each name, the files and ways it was found (to check by hand)
"""

import pathlib
import re
import sys

NAME = re.compile(r"[a-z][a-z0-9_-]*(-[a-z0-9_]+)*")
DISPATCH = re.compile(r'\.name\s*=\s*"([^"]+)"')
EXECUTE = re.compile(r'"execute"\s*:\s*"([^"]+)"')
SHELL = re.compile(r"^\(QEMU\)[ \t]+(\S+)", re.MULTILINE)
UNDERLINE = re.compile(r"\s*-{3,}\s*")


def headings(text):
    """Lines underlined by a line of dashes that look like a command name."""
    lines = text.splitlines()
    for above, line in zip(lines, lines[1:]):
        title = above.strip().lstrip("@")
        if UNDERLINE.fullmatch(line) and NAME.fullmatch(title):
            yield title


def names(path):
    """(name, how) pairs found in one document."""
    text = path.read_text(encoding="utf-8")
    for name in DISPATCH.findall(text):
        yield name, "dispatch"
    for name in headings(text):
        yield name, "heading"
    for name in EXECUTE.findall(text):
        yield name, "execute"
    for name in SHELL.findall(text):
        yield name, "qmp-shell"


def main(argv):
    show_sources = "--sources" in argv
    args = [a for a in argv if a != "--sources"]
    ref = pathlib.Path(args[0]) if args else (
        pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "qmp-reference")
    docs = sorted(p for p in ref.iterdir() if p.suffix in (".hx", ".txt"))
    if not docs:
        sys.exit(f"no reference documents in {ref}")
    found = {}
    for doc in docs:
        for name, how in names(doc):
            if not NAME.fullmatch(name):
                sys.exit(f"{doc.name}: {name!r} does not look like a command name")
            found.setdefault(name, set()).add(f"{doc.name}:{how}")
    for name in sorted(found):
        if show_sources:
            print(f"{name}\t{' '.join(sorted(found[name]))}")
        else:
            print(name)


if __name__ == "__main__":
    main(sys.argv[1:])
