"""The Dockerfiles, checked as far as a machine without a Docker engine allows: parsed into
stages and instructions, their sources present, their entry points real console scripts."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests import manifests as m

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"Dockerfile.server": "proxy-server", "Dockerfile.agent": "proxy-agent"}
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "python3-dev", "apt-get install", "apk add")


@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, continuation lines joined."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        assert re.fullmatch(r"[A-Z]+", keyword), f"not an instruction: {line!r}"
        if keyword == "FROM":
            words = rest.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), line
            stages.append(Stage(words[0], words[2] if len(words) == 3 else ""))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def stages_of(name: str) -> list[Stage]:
    return parse_dockerfile((ROOT / name).read_text())


@pytest.mark.parametrize("name", IMAGES)
def test_multi_stage_on_slim_python(name: str) -> None:
    stages = stages_of(name)
    assert len(stages) >= 2
    assert all(s.base == "python:3.11-slim" for s in stages)
    final = stages[-1]
    copied = list(final.args("COPY"))
    assert copied and all(args.startswith("--from=") for args in copied), "the final stage copies only built artefacts"
    named = {s.name for s in stages[:-1]}
    assert {args.split()[0].removeprefix("--from=") for args in copied} <= named


@pytest.mark.parametrize("name", IMAGES)
def test_final_stage_runs_unprivileged_without_build_tools(name: str) -> None:
    final = stages_of(name)[-1]
    users = final.args("USER")
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can only check numbers)"
    runs = " ".join(final.args("RUN"))
    assert not [tool for tool in BUILD_TOOLS if tool in runs]
    assert "pip uninstall" in runs, "pip is removed from the final image"


@pytest.mark.parametrize(("name", "script"), IMAGES.items())
def test_entry_point_is_the_documented_path_and_a_console_script(name: str, script: str) -> None:
    stages = stages_of(name)
    final = stages[-1]
    (entrypoint,) = final.args("ENTRYPOINT")
    assert json.loads(entrypoint) == [f"/{script}"], "exec form, so `command: [\"/" + script + "\"]` matches"
    links = [words for args in final.args("RUN") for words in _commands(args) if words[:2] == ["ln", "-s"]]
    target = next(w[2] for w in links if w[3] == f"/{script}")
    venv = target.rsplit("/bin/", 1)[0]
    assert any(args.split()[1:] == [venv, venv] for args in final.args("COPY")), "the link points into the copied venv"
    assert target == f"{venv}/bin/{script}"
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[script].value == declared[script]
    assert callable(scripts[script].load())


def _commands(run: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|;", run) if part.strip()]


@pytest.mark.parametrize("name", IMAGES)
def test_build_stage_copies_what_the_package_needs(name: str) -> None:
    build = stages_of(name)[0]
    sources = [src for args in build.args("COPY") for src in args.split()[:-1] if not src.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} missing"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources)
    assert "pyproject.toml" in sources and project["project"]["readme"] in sources
    runs = " ".join(build.args("RUN"))
    assert "--only-binary=:all:" in runs, "dependencies come as wheels: no compiler needed anywhere"


@pytest.mark.parametrize(("name", "script"), IMAGES.items())
def test_manifests_use_these_images_and_entry_points(name: str, script: str) -> None:
    path = m.SERVER_POD if script == "proxy-server" else m.AGENT_DAEMONSET
    _doc, container = m.only_container(path)
    assert container["command"] == json.loads(stages_of(name)[-1].args("ENTRYPOINT")[0])
    assert container["image"].split(":")[0].endswith(f"/{script}")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"].endswith(f":{version}")


def test_parser_rejects_what_docker_would() -> None:
    with pytest.raises(AssertionError):
        parse_dockerfile("RUN echo before any FROM\n")
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM python:3.11-slim\nRUN echo \\\n")
    (stage,) = parse_dockerfile("# c\nFROM python:3.11-slim AS x\nRUN a \\\n  # inside\n  && b\n")
    assert stage.name == "x" and stage.args("RUN") == ["a  && b"]


# ----------------------------------------------------------------------------- .dockerignore
def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line, with Docker's rules: `#` comments, `!` re-includes, paths
    relative to the context root (a leading `/` is dropped), `*` and `?` stay within one path
    element, `**` spans any number of them, and the last matching line wins."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = line.removeprefix("!").strip().lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((excludes, re.compile(regex)))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (a match on a parent counts)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for excludes, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            verdict = excludes
    return verdict


def context_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules((ROOT / ".dockerignore").read_text())


def test_dockerignore_matcher_follows_dockers_rules() -> None:
    rules = dockerignore_rules("*\n!pkg\n__pycache__\n**/*.pyc\n/tmp/**\n")
    assert ignored(rules, "notes.txt") and ignored(rules, ".git/HEAD")
    assert not ignored(rules, "pkg/mod.py")
    assert not ignored(rules, "pkg/__pycache__/mod.py"), "no leading **/: matches at the root only"
    assert ignored(rules, "pkg/sub/mod.pyc")
    assert ignored(rules, "tmp/a/b")


@pytest.mark.parametrize("name", IMAGES)
def test_dockerignore_sends_every_copy_source(name: str) -> None:
    rules = context_rules()
    for stage in stages_of(name):
        for args in stage.args("COPY"):
            words = args.split()
            if any(word.startswith("--from=") for word in words):
                continue
            for src in words[:-1]:
                root = ROOT / src
                files = [root] if root.is_file() else [p for p in root.rglob("*.py*") if "__pycache__" not in p.parts]
                assert files, f"COPY source {src} is empty"
                sent = [p for p in files if not ignored(rules, p.relative_to(ROOT).as_posix())]
                assert sent == files, f".dockerignore leaves out part of COPY source {src}"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "bench/results/run.json", "tests/interop/agent.json", "tests/unit/test_cli.py",
     "proxy_server/__pycache__/app.cpython-311.pyc", "proxy_common/pb/x.pyc", ".pytest_cache/v", ".ruff_cache/x",
     ".mypy_cache/x", "konnectivity_py.egg-info/PKG-INFO", "pki/ca.key", "demo-run/server.key", "configs/x.yaml"],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert ignored(context_rules(), path)


def test_build_context_is_only_the_package_sources() -> None:
    rules = context_rules()
    sent = []
    for top, dirs, files in os.walk(ROOT):
        here = Path(top).relative_to(ROOT).as_posix().removeprefix(".")
        dirs[:] = [d for d in dirs if not ignored(rules, f"{here}/{d}".lstrip("/"))]  # nothing below is re-included
        sent += [f"{here}/{f}".lstrip("/") for f in files if not ignored(rules, f"{here}/{f}".lstrip("/"))]
    outside = [path for path in sent if path not in ("pyproject.toml", "README.md")
               and not re.fullmatch(r"proxy_(common|server|agent)/[\w/]+\.pyi?", path)]
    assert "proxy_server/cli.py" in sent
    assert outside == []
