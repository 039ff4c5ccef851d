"""Several environments in one repository, end to end through make and the pipelines' scripts:
state/acc and state/prod, each with its own CA and passphrases, a bare remote to push to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from support import GIT_IDENTITY, git, users_yaml

from reconciler.pki import open_key

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASES = {
    "acc": ("acc CA passphrase, long enough", "acc key passphrase, long enough"),
    "prod": ("prod CA passphrase, long enough", "prod key passphrase, long enough"),
}

pytestmark = pytest.mark.usefixtures("isolated_git")


def make(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "STATE", "ENV")
        and not k.startswith("RECONCILER_")
    }
    return subprocess.run(
        ["make", "-s", *args],
        cwd=repo,
        env={**env, **GIT_IDENTITY},
        capture_output=True,
        text=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A state repository with two environments, its passphrases in .secrets/ENV, pushed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "Makefile", repo)
    shutil.copy(ROOT / "pyproject.toml", repo)
    os.utime(repo / "pyproject.toml", (0, 0))  # older than the venv: make installs nothing
    (repo / ".venv").symlink_to(ROOT / ".venv")
    (repo / ".gitignore").write_text(".venv\n.secrets/\n*.prom\n")
    for env, (ca, keys) in PASSPHRASES.items():
        (repo / "state" / env).mkdir(parents=True)
        (repo / "state" / env / "users.yaml").write_text(
            users_yaml("  - name: alice\n  - name: bob\n", subject_o=env)
        )
        secrets = repo / ".secrets" / env
        secrets.mkdir(parents=True, mode=0o700)
        for name, value in (("ca.pass", ca), ("keys.pass", keys)):
            (secrets / name).write_text(value)
            (secrets / name).chmod(0o600)
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(remote))
    git(repo, "init", "--quiet", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "two environments")
    git(repo, "remote", "add", "origin", str(remote))
    git(repo, "push", "--quiet", "-u", "origin", "main")
    return repo


def ca_of(repo: Path, env: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((repo / "state" / env / "ca" / "ca.crt").read_bytes())


def test_each_environment_has_its_own_ca_and_passphrases(repo: Path, tmp_path: Path) -> None:
    done = make(repo, "reconcile", "ENV=acc")
    assert done.returncode == 0, done.stderr
    assert (repo / "state/acc/clients/alice.crt").exists()
    assert not (repo / "state/prod/ca").exists()  # ENV=acc touches acc only
    assert git(repo, "status", "--porcelain", "state") == ""  # committed

    # without ENV, renew runs for every environment, pushes, and writes one textfile each
    done = make(repo, "renew", f"PROMETHEUS_FILE={tmp_path}/reconciler-%.prom")
    assert done.returncode == 0, done.stderr
    assert "== renew state/acc" in done.stdout
    assert "== renew state/prod" in done.stdout
    assert (repo / "state/prod/clients/bob.crt").exists()
    assert ca_of(repo, "acc").public_key() != ca_of(repo, "prod").public_key()
    for env, (ca_passphrase, _) in PASSPHRASES.items():
        ca_key = (repo / "state" / env / "ca" / "ca.key").read_bytes()
        assert open_key(ca_key, ca_passphrase.encode()) is not None  # its own passphrase opens it
        other = PASSPHRASES["prod" if env == "acc" else "acc"][0]
        # open_key, not a match on "password": 1 wrong passphrase in 256 passes the CBC padding
        # check and fails as unparsable data instead (the CI failure of dc0346d).
        assert open_key(ca_key, other.encode()) is None
        textfile = (tmp_path / f"reconciler-{env}.prom").read_text()
        labels = f'environment="{env}",name="crl"'
        assert f"reconciler_crl_next_update_timestamp_seconds{{{labels}}}" in textfile
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "origin/main")
    remote_files = git(repo, "ls-tree", "-r", "--name-only", "origin/main", "state")
    assert "state/acc/ca/ca.crt" in remote_files
    assert "state/prod/ca/ca.crt" in remote_files


def test_renew_goes_on_past_a_failed_environment_and_fails_at_the_end(repo: Path) -> None:
    assert make(repo, "renew").returncode == 0
    (repo / "state/acc/users.yaml").write_text("version: 1\nusers: [\n")
    prod = repo / "state/prod/users.yaml"
    prod.write_text(prod.read_text().replace("  - name: bob\n", "  - name: bob\n  - name: carol\n"))
    git(repo, "commit", "--quiet", "-am", "a broken acc, and carol in prod")
    done = make(repo, "renew")
    assert done.returncode != 0
    assert "make renew failed for: state/acc" in done.stderr
    assert (repo / "state/prod/clients/carol.crt").exists()  # prod renewed all the same


def test_make_names_the_environment_it_needs(repo: Path) -> None:
    done = make(repo, "plan")
    assert done.returncode != 0
    assert "several environments (acc prod): pick one with ENV=NAME" in done.stderr
    validated = make(repo, "validate")
    assert validated.returncode == 0, validated.stderr
    assert "state/acc/users.yaml is valid" in validated.stdout
    assert "state/prod/users.yaml is valid" in validated.stdout
    shutil.copy(repo / "state/acc/users.yaml", repo / "state/users.yaml")
    mixed = make(repo, "validate")
    assert mixed.returncode != 0
    assert "state/users.yaml and state/ENV/users.yaml both exist" in mixed.stderr


def test_a_change_plans_and_applies_only_the_environments_it_touches(repo: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    assert make(repo, "environments").stdout.split() == ["state/acc", "state/prod"]
    prod = repo / "state/prod/users.yaml"
    prod.write_text(prod.read_text() + "# reviewed\n")
    git(repo, "commit", "--quiet", "-am", "prod only")
    assert make(repo, "environments", f"SINCE={base}").stdout.split() == ["state/prod"]
    assert make(repo, "environments", "SINCE=no-such-ref").stdout.split() == [
        "state/acc",
        "state/prod",
    ]  # a range git cannot diff concerns every environment
    (repo / ".gitattributes").write_text("state/** -text\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "--quiet", "-m", "attributes")
    assert make(repo, "environments", f"SINCE={base}").stdout.split() == [
        "state/acc",
        "state/prod",
    ]
    done = make(repo, "renew", f"SINCE={git(repo, 'rev-parse', 'HEAD')}")
    assert done.returncode == 0
    assert "== renew" not in done.stdout


def plan_script(ci: str) -> str:
    """The pull-request plan job's script, as the CI service would run it."""
    if ci == "github":
        flow = yaml.safe_load((ROOT / ".github/workflows/plan.yml").read_text())
        steps = flow["jobs"]["plan"]["steps"]
        script: str = next(s["run"] for s in steps if s.get("name", "").startswith("Plan each"))
        return script
    pipeline = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    return "\n".join(pipeline["plan"]["script"])


@pytest.mark.parametrize("ci", ["github", "gitlab"])
def test_pull_request_plan_covers_each_touched_environment(
    repo: Path, tmp_path: Path, ci: str
) -> None:
    assert make(repo, "renew").returncode == 0
    git(repo, "push", "--quiet")
    git(repo, "checkout", "--quiet", "-b", "request")
    acc = repo / "state/acc/users.yaml"
    acc.write_text(acc.read_text().replace("  - name: bob\n", ""))
    git(repo, "commit", "--quiet", "-am", "bob leaves acc")
    summary = tmp_path / "summary.md"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS") and not k.startswith("RECONCILER_")
    }
    env |= {"GITHUB_STEP_SUMMARY": str(summary), "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main"}
    env |= {"BASE": "origin/main"} if ci == "github" else {}
    summary.write_text("")
    script = plan_script(ci)
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr  # exit 2 of plan (changes) is a success
    plan = (repo / "plan.md").read_text()
    assert "## `state/acc`" in plan
    assert "state/prod" not in plan
    assert "client/bob" in plan
    assert plan in (summary.read_text() if ci == "github" else done.stdout)

    # a request that slips another file into an environment fails the job
    (repo / "plan.md").unlink()
    (repo / "state/prod/clients/alice.crt").write_text("swapped\n")
    git(repo, "commit", "--quiet", "-am", "swap a certificate")
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    plan = (repo / "plan.md").read_text()
    assert "clients/alice.crt: changed" in plan.split("## `state/prod`")[1]


def test_issuing_workflow_lists_one_job_per_touched_environment(repo: Path, tmp_path: Path) -> None:
    flow = yaml.safe_load((ROOT / ".github/workflows/reconcile.yml").read_text())
    listing = flow["jobs"]["environments"]["steps"][-1]["run"]
    output = tmp_path / "output"
    base = git(repo, "rev-parse", "HEAD")
    acc = repo / "state/acc/users.yaml"
    acc.write_text(acc.read_text() + "# reviewed\n")
    git(repo, "commit", "--quiet", "-am", "acc only")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    for since, expected in (
        (base, [("state/acc", "acc")]),
        ("", [("state/acc", "acc"), ("state/prod", "prod")]),
    ):
        output.write_text("")
        done = subprocess.run(
            ["bash", "-e", "-c", listing],
            cwd=repo,
            env={**env, "SINCE": since, "GITHUB_OUTPUT": str(output)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        matrix = json.loads(output.read_text().removeprefix("matrix="))
        assert [(job["state"], job["name"]) for job in matrix] == expected
