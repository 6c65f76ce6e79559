"""The study registry: names, lookup, registration, discovery of ``STUDY`` modules in the package."""

from __future__ import annotations

import sys

import pytest

import curvlab as cl
import curvlab.studies as studies_pkg


def test_names_and_get(toy):
    assert "toy" in cl.studies.names()
    assert cl.studies.get("toy") is toy.STUDY
    with pytest.raises(ValueError, match=r"unknown study 'nope'; valid: .*toy"):
        cl.studies.get("nope")


def test_register_refuses_a_second_study_of_the_same_name(toy):
    other = cl.studies.Study(name="toy", description="d", paper="p", config={"k": [1]},
                             cells=lambda c: cl.studies.grid(k=c["k"]), run_cell=toy.run_cell)
    with pytest.raises(ValueError, match="already registered"):
        cl.studies.register(other)
    assert cl.studies.register(toy.STUDY) is toy.STUDY  # the same study again is fine
    with pytest.raises(TypeError, match="expected a curvlab.studies.Study"):
        cl.studies.register("toy")


def test_study_modules_in_the_package_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "found_here.py").write_text(
        "from curvlab.studies import Study, grid\n"
        "def run_cell(cell, config):\n    raise NotImplementedError\n"
        "STUDY = Study(name='found-here', description='d', paper='p', config={'k': [1]},\n"
        "              cells=lambda c: grid(k=c['k']), run_cell=run_cell)\n")
    (tmp_path / "broken_here.py").write_text("raise RuntimeError('cannot import me')\n")
    monkeypatch.setattr(studies_pkg, "__path__", [*studies_pkg.__path__, str(tmp_path)])
    monkeypatch.setattr(studies_pkg, "_discovered", False)
    try:
        with pytest.warns(UserWarning, match="cannot import the study module broken_here"):
            assert "found-here" in cl.studies.names()
        assert cl.studies.get("found-here").description == "d"
    finally:
        studies_pkg._REGISTRY.pop("found-here", None)
        for name in ("curvlab.studies.found_here", "curvlab.studies.broken_here"):
            sys.modules.pop(name, None)
