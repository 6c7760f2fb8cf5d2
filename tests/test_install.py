"""Installs where it says: the declared lowest Python is one every dependency supports, and the shipped
constraints file pins the libraries that decide pixels, within the ranges qrobust declares."""
from __future__ import annotations

import importlib.metadata as md
import json

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from helpers import small_corpus
from qrobust.cli import main
from qrobust.shared import versions


def lowest_python() -> Version:
    (spec,) = SpecifierSet(md.metadata("qrobust")["Requires-Python"])
    assert spec.operator == ">=", "requires-python is a lower bound"
    return Version(spec.version)


def runtime_requirements() -> list[Requirement]:
    """qrobust's own dependencies (no extras) that apply on the lowest declared Python."""
    environment = {"python_version": f"{lowest_python().major}.{lowest_python().minor}", "extra": ""}
    return [r for r in map(Requirement, md.requires("qrobust") or [])
            if r.marker is None or Marker(str(r.marker)).evaluate(environment)]


def test_every_dependency_supports_the_lowest_declared_python():
    lowest, refusing = lowest_python(), []
    for requirement in runtime_requirements():
        declared = md.metadata(requirement.name).get("Requires-Python")
        if declared and lowest not in SpecifierSet(declared):
            refusing.append(f"{requirement.name} {md.version(requirement.name)} requires Python {declared}")
    assert not refusing, f"requires-python says >={lowest}, but " + "; ".join(refusing)
    assert not any(r.marker and "python_version" in str(r.marker) and
                   not Marker(str(r.marker)).evaluate({"python_version": str(lowest), "extra": ""})
                   for r in map(Requirement, md.requires("qrobust") or [])), "a dependency for unsupported Pythons"


def pinned() -> dict[str, str]:
    lines = versions.constraints_file().read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_the_constraints_file_pins_each_pixel_library_within_the_declared_ranges():
    pins = pinned()
    assert versions.constraints_file().is_file()  # shipped in the package, where verify points
    opencv = {"opencv-python", "opencv-python-headless"}
    assert set(pins) - opencv == set(versions.PIXEL_DISTRIBUTIONS) - opencv and len(set(pins) & opencv) == 1
    declared = {r.name.lower(): r.specifier for r in runtime_requirements()}
    for name, version in pins.items():
        Version(version)  # a real version
        if name.lower() in declared:
            assert version in declared[name.lower()], f"{name}=={version} is outside qrobust's {declared[name.lower()]}"


def test_corpus_pins_come_from_its_manifest_and_never_carry_more_than_a_version():
    manifest = {"versions": {"numpy": "1.26.4", "Pillow": "10.0.0 --index-url http://x", "scipy": "1.11.0",
                             "opencv-python-headless": "4.9.0.80", "av": "12.0.0", "x264": "core 164"},
                "suite": {"spec": {"natural": {}}}}
    assert versions.corpus_pins(manifest) == ["numpy==1.26.4", "scipy==1.11.0", "opencv-python-headless==4.9.0.80"]
    manifest["suite"]["spec"]["sequence"] = {}  # FFmpeg decides pixels of sequences: av is pinned too
    assert versions.corpus_pins(manifest)[-1] == "av==12.0.0"


def test_verify_check_env_names_the_differences_and_the_pins_that_match(tmp_path, monkeypatch, capsys):
    corpus = small_corpus(tmp_path, "clean/*", shard=4)
    assert main(["-q", "verify", str(corpus), "--check-env"]) == 0
    capsys.readouterr()
    built = json.loads((corpus / "manifest.json").read_text())["versions"]
    here = versions.library_versions()
    monkeypatch.setattr(versions, "library_versions", lambda: dict(here, numpy="0.0.1"))
    assert main(["-q", "verify", str(corpus), "--check-env"]) == 1
    captured = capsys.readouterr()
    assert f"numpy: corpus built with {built['numpy']}, installed 0.0.1" in captured.out
    assert f"pip install numpy=={built['numpy']} Pillow=={built['Pillow']}" in captured.err
    assert str(versions.constraints_file()) in captured.err
    assert main(["verify", str(corpus), "--check-env", "--json"]) == 1
    assert f"numpy=={built['numpy']}" in json.loads(capsys.readouterr().out)["pins"]


@pytest.mark.parametrize("module", ["qrobust.shared.suites", "qrobust.score.adversarial"])
def test_no_fallbacks_for_pythons_that_are_not_supported(module):
    import importlib
    import inspect

    assert "tomli" not in inspect.getsource(importlib.import_module(module))
