"""The project stands alone and keeps its layers: no tracked file cites a document outside the repository,
every relative link in the docs resolves, and only the command layer imports project modules by name."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# documents and folders that exist beside the repository for the people building it, never for its users
# (spelled in pieces, so this file does not match itself)
_DOCS = ("SETT" "INGS", "DES" "IGN", "STY" "LE")
OUTSIDE = re.compile("|".join([*(rf"{d}\.md" for d in _DOCS), r"\.\./sha" r"red\b", "issue " "notes",
                               "its own " "issue", r"\bsee the " r"issue\b"]))
PROGRAMS = ("generate", "score", "train", "shared")


def tracked() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names.splitlines() if (ROOT / n).is_file()]


def test_no_tracked_file_cites_a_document_outside_the_repository():
    found = []
    for path in tracked():
        if path.suffix in (".png", ".jpg", ".safetensors") or path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
                  for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


def test_relative_links_in_the_docs_resolve():
    broken = []
    for path in [p for p in tracked() if p.suffix == ".md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#")[0]).resolve()
            if not file.is_relative_to(ROOT) or not file.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def _named_imports(tree: ast.AST):
    """(line, name) of every project module a module imports by name: ``import_module("qrobust...")``,
    ``__import__("qrobust...")``, or a ``"qrobust.pkg.module:attr"`` entry-point string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__") and str(node.args[0].value).startswith("qrobust"):
                yield node.lineno, node.args[0].value
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"qrobust(\.\w+)+:\w+", node.value):
            yield node.lineno, node.value


def test_only_the_command_layer_imports_project_modules_by_name():
    """A module imported by name is an import import-linter cannot see: only cli/ may do that (it resolves
    subcommands lazily so `qrobust --help` stays fast)."""
    found = [f"{path.relative_to(ROOT)}:{line}: {name!r}"
             for package in PROGRAMS for path in sorted((ROOT / package).rglob("*.py"))
             for line, name in _named_imports(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "\n".join(found)
    # and the check sees such an import where there is one
    assert list(_named_imports(ast.parse('importlib.import_module("qrobust.score.run")')))
    assert list(_named_imports(ast.parse('resolve("qrobust.score.run:score")')))
