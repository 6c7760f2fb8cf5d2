"""Text from others, made inert for the format it is written into.

A report is built from files a collaborator sent (summaries, results folders,
the manifests and checkpoints they were made from), so any name in it (model,
architecture, method, corruption, perturbation, variant, attack, results
folder) and any note or warning may carry markup: an HTML ``<script>`` or
``onload=``, a LaTeX ``\\input``, a spreadsheet formula, a Markdown ``|``, a
matplotlib ``$...$``, a terminal escape. Every writer of the report passes
such text through the one function here for its format. Text qrobust wrote
itself (its labels, numbers it formatted) comes out of them unchanged.
"""
from __future__ import annotations

import html as _html
import re

# C0 and C1 controls, DEL, the line and paragraph separators, and the bidirectional overrides and isolates
# (text that displays in another order than it reads): none belongs in a name or a one-line note
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# what a file name, an HTML id or a link target of the report may be
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the first characters with which a spreadsheet cell becomes a formula (or hides one behind white space)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_LATEX = {"\\": r"\textbackslash{}", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}", "&": r"\&",
          "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "<": r"\textless{}",
          ">": r"\textgreater{}", "|": r"\textbar{}"}


def plain(text) -> str:
    """One line of plain text (findings.txt, a terminal): every control character a space."""
    return _CONTROL.sub(" ", str(text))


def visible(text) -> str:
    """One line that still shows what was there (error messages, terminals): every character that does not
    print (controls, separators, format characters) as its escape, ``\\n``, ``\\x1b``, ``\\u202e``."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


def html(text) -> str:
    """Text for an HTML page, in an element or inside a quoted attribute."""
    return _html.escape(plain(text), quote=True)


def latex(text) -> str:
    """Text for LaTeX: every character TeX would read as a command, a group, math, a comment or an alignment
    (``^^5c`` is a backslash to TeX, so ``^`` too) printed as itself."""
    return "".join(_LATEX.get(ch, ch) for ch in plain(text))


def markdown(text) -> str:
    """Text for a cell of a Markdown table: no ``|`` that splits it, no tag or autolink (``<``), no inline
    link (``](``), on one line."""
    text = plain(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("](", "]\\(")


def csv_cell(value):
    """A CSV cell: numbers (qrobust's own) stay numbers; text that a spreadsheet would run as a formula gets a
    leading ``'``; None is empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def mathtext(text) -> str:
    """A figure's label: matplotlib reads text between two ``$`` as math; an escaped ``$`` is printed."""
    return plain(text).replace("$", r"\$")


def is_name(name) -> bool:
    """Whether ``name`` may become a file name, an HTML id or a link target as it is."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None
