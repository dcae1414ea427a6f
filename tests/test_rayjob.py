"""deploy/rayjob.yaml, the KubeRay RayJob the README shows: it parses, its entrypoint is a
command our parser takes, the key comes from a Secret only, every pod shares the output's
volume, shards go to the workers, and its Ray is the one `chat-pipeline[ray]` pins."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pipeline.parser import parser

if os.environ.get("CI"):
    import yaml
else:
    yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy/rayjob.yaml"
KEY_ENV = "LUMENFALL_API_KEY"


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    doc = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(doc, dict)
    return doc


def _groups(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The head group, then each worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for g in _groups(job) for c in g["template"]["spec"]["containers"]]


def _entrypoint(job: dict[str, Any]) -> Any:
    return parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])


def _mounts(group: dict[str, Any]) -> set[tuple[str, str]]:
    """(claim, path) of every claim mounted in every container of the group."""
    spec = group["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])}
    per_container = [
        {(claims[m["name"]], m["mountPath"]) for m in c.get("volumeMounts", []) if m["name"] in claims}
        for c in spec["containers"]
    ]
    return set.intersection(*per_container)


def test_it_is_a_rayjob_that_runs_pipeline_ray(job: dict[str, Any]) -> None:
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert shlex.split(job["spec"]["entrypoint"])[:2] == ["pipeline", "ray"]
    args = _entrypoint(job)
    assert args.command == "ray"
    assert args.shards == 8
    assert PurePosixPath(args.output).is_relative_to("/data")
    assert args.address is None  # KubeRay sets RAY_ADDRESS for the driver


def test_every_container_takes_the_key_from_a_secret(job: dict[str, Any]) -> None:
    for container in _containers(job):
        env = {e["name"]: e for e in container.get("env", [])}
        assert KEY_ENV in env, f"{container['name']} has no {KEY_ENV}: its shards would be refused"
        assert "value" not in env[KEY_ENV]
        assert env[KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "pipeline-api-key", "key": "key"}


def test_no_key_is_written_in_the_manifest(job: dict[str, Any]) -> None:
    secret_like = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
    for container in _containers(job):
        for e in container.get("env", []):
            assert not (secret_like.search(e["name"]) and "value" in e), e
    runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not any(secret_like.search(name) for name in runtime_env.get("env_vars", {}))
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", MANIFEST.read_text())


def test_every_pod_mounts_the_output_folder_from_one_claim(job: dict[str, Any]) -> None:
    mounts = [_mounts(g) for g in _groups(job)]
    assert mounts[0], "the head mounts no claim: the driver could not merge the shards"
    assert all(m == mounts[0] for m in mounts), mounts
    args = _entrypoint(job)
    for path in (args.output, args.job):  # shards read the job file on their own node too
        assert any(PurePosixPath(path).is_relative_to(at) for _, at in mounts[0]), path


def test_shards_go_to_the_workers(job: dict[str, Any]) -> None:
    head, *workers = _groups(job)
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert workers
    for group in workers:
        assert group["replicas"] >= 1
        assert group.get("rayStartParams", {}).get("num-cpus") != "0"


def test_its_ray_is_the_one_pipeline_pins(job: dict[str, Any]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = next(m.group(1) for d in extras["ray"] if (m := re.fullmatch(r"ray==(\S+)", d)))
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned
    for container in _containers(job):
        assert container["image"].endswith(f":{pinned}"), container["image"]
