"""lukewarm/build.py without Docker: the generated Dockerfile, content tags, the init scaffold."""
from __future__ import annotations

from pathlib import Path

import pytest

from lukewarm.build import BuildError, content_tag, dockerfile, init, prepare_context


def test_the_dockerfile_copies_deps_and_code_and_trains_when_asked() -> None:
    plain = dockerfile(False, False)
    assert plain.startswith("FROM lukewarm/python:bookworm\nCOPY app/ /app/\nWORKDIR /app\n")
    assert "compileall" in plain and "/app" in plain.splitlines()[-1] and "deps" not in plain
    text = dockerfile(True, True)
    assert "COPY deps/ /opt/lukewarm/deps/\nENV PYTHONPATH=/opt/lukewarm/deps" in text
    # Trained first (it may write code), then everything compiled to bytecode once, in the image.
    lines = text.splitlines()
    assert lines[-2] == "RUN python3 train.py"
    assert "compileall" in lines[-1] and "/opt/lukewarm/deps /app" in lines[-1]


def test_the_content_tag_follows_names_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    first = content_tag(tmp_path)
    assert first == content_tag(tmp_path) and len(first) == 12
    (tmp_path / "a.py").write_text("x = 2\n")
    assert content_tag(tmp_path) != first
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    assert content_tag(tmp_path) != first


def test_a_context_without_requirements_needs_no_pip(tmp_path: Path) -> None:
    model = tmp_path / "m"
    init(str(model), "m")
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text("secret")
    context = prepare_context(model, tmp_path / "work")
    assert (context / "app" / "main.py").exists() and not (context / "app" / ".git").exists()
    assert not (context / "deps").exists() and "COPY deps" not in (context / "Dockerfile").read_text()


def test_a_directory_with_nothing_to_serve_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError):
        prepare_context(tmp_path, tmp_path / "work")


def test_init_keeps_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("mine")
    written = init(str(tmp_path), "x")
    assert (tmp_path / "main.py").read_text() == "mine" and str(tmp_path / "main.py") not in written
    assert {Path(p).name for p in written} == {"requirements.txt", "README.md"}
