"""Print pip requirements that pin every core dependency of topoxr to its declared floor.

With ``--extras viz umap ...``, the named optional dependencies are pinned too.
``make test-min`` installs them into ``.venv-min`` and runs the test suite there, so a
floor in ``pyproject.toml`` is a version the tests passed with, not a guess: a user whose
environment already holds the oldest allowed release of a dependency gets a topoxr that
imports and computes what the newest one does. Each floor ``name>=X.Y.Z`` becomes
``name==X.Y.Z``, that very release (``>=3.1`` means 3.1.0, so a floor that needs a patch
release names it; a ceiling ``,<Y`` is allowed and left out); a dependency without a
``>=`` floor, or with any other specifier, is refused, so that none is left untested.

Run with the Python that will install them: ``python scripts/min_versions.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

#: ``name[extras]>=version``, optionally with a ceiling ``,<version``: nothing else is a
#: floor that can be pinned and tested
FLOOR = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,.-]+\])?)"
                   r"\s*>=\s*(?P<version>[0-9]+(\.[0-9]+)*)(\s*,\s*<\s*[0-9]+(\.[0-9]+)*)?\s*$")


def floors(pyproject: Path, extras: Sequence[str] = ()) -> list[str]:
    """The pinned requirement of every entry of ``[project] dependencies`` and ``extras``.

    Parameters
    ----------
    pyproject : Path
        The ``pyproject.toml`` to read.
    extras : sequence of str, optional
        Names of ``[project.optional-dependencies]`` whose entries are pinned too.

    Returns
    -------
    list of str
        One ``name==version`` requirement per dependency, in the file's order, the core's
        first, then each extra's.

    Raises
    ------
    ValueError
        If a dependency has no single ``>=`` floor (it could not be tested at its floor),
        or an extra is not declared.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    dependencies = list(project["dependencies"])
    declared = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in declared:
            raise ValueError(f"no extra {extra!r} in {pyproject}; declared: {sorted(declared)}")
        dependencies += declared[extra]
    pinned = []
    for requirement in dependencies:
        match = FLOOR.match(requirement)
        if match is None:
            raise ValueError(f"dependency {requirement!r} has no single '>=' floor to test; "
                             "write it as 'name>=version'")
        pinned.append(f"{match['name']}=={match['version']}")
    return pinned


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="*", default=[], help="optional dependencies too")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    lines = floors(root / "pyproject.toml", args.extras)
    sys.stdout.write("".join(f"{line}\n" for line in lines))
