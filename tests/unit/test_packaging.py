"""The pins: every dependency of pyproject.toml is pinned exactly in both constraint sets."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert match, f"constraints/{name}: {line!r} is not an exact pin"
            out[canonicalize_name(match[1])] = match[2]
    return out


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(("constraints", "extras"), [("cpu.txt", ("dev",)), ("gpu.txt", ("vllm",))])
def test_every_requirement_is_pinned_within_its_range(constraints, extras):
    pinned = pins(constraints)
    for req in requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not pinned in constraints/{constraints}"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints/{constraints} pins {req.name}=={pinned[name]}, outside {req.specifier}"
        )


def test_cpu_and_gpu_sets_agree_where_they_can():
    cpu, gpu = pins("cpu.txt"), pins("gpu.txt")
    assert cpu["torch"] == "2.13.0"  # the CPU build that lies on disk
    assert gpu["torch"] == "2.14.0"  # what vLLM 0.33 pins
    for name in ("transformers", "ray", "deepspeed", "math-verify"):
        assert cpu[name] == gpu[name], name
