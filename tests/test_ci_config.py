"""Structure checks of the upstream-style CircleCI matrix and of .ci/run (no CircleCI here)."""

import os
import re

import pytest

yaml = pytest.importorskip("yaml")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(ROOT, ".circleci", "config.yml")) as f:
        return yaml.safe_load(f)


def test_version_and_sections(config):
    assert config["version"] == 2.1
    for section in ("executors", "commands", "jobs", "workflows"):
        assert isinstance(config[section], dict) and config[section], section


def test_every_job_has_an_executor_and_steps(config):
    for name, job in config["jobs"].items():
        assert "executor" in job or "docker" in job, name
        executor = job.get("executor")
        if executor is not None:
            executor_name = executor if isinstance(executor, str) else executor["name"]
            assert executor_name in config["executors"], (name, executor_name)
        assert isinstance(job["steps"], list) and job["steps"], name
        for step in job["steps"]:
            step_name = step if isinstance(step, str) else next(iter(step))
            known = {"checkout", "run", "store_test_results", "store_artifacts"}
            assert step_name in known or step_name in config["commands"], (name, step_name)


def test_workflow_jobs_are_defined_and_requirements_exist(config):
    for wf_name, wf in config["workflows"].items():
        names = []
        for entry in wf["jobs"]:
            job_name = entry if isinstance(entry, str) else next(iter(entry))
            assert job_name in config["jobs"], (wf_name, job_name)
            names.append(job_name)
        for entry in wf["jobs"]:
            if isinstance(entry, dict):
                for req in next(iter(entry.values())).get("requires", []):
                    assert req in names, (wf_name, req)


def test_matrix_covers_pythons_and_two_torch_versions(config):
    unittest = next(
        e["unittest"]
        for e in config["workflows"]["commit"]["jobs"]
        if isinstance(e, dict) and "unittest" in e
    )
    params = unittest["matrix"]["parameters"]
    assert {"3.9", "3.10", "3.11", "3.12"} <= set(params["python"])
    assert len(set(params["torch"])) >= 2
    declared = set(config["jobs"]["unittest"]["parameters"])
    assert set(params) == declared


def test_lint_integration_and_docs_jobs_exist(config):
    assert {"lint", "unittest", "integrationtest", "docs"} <= set(config["jobs"])
    lint_cmds = " ".join(
        s["run"]["command"]
        for s in config["jobs"]["lint"]["steps"]
        if isinstance(s, dict) and "run" in s
    )
    assert "flake8" in lint_cmds and "isort" in lint_cmds and "black" in lint_cmds
    # a check whose failure is swallowed cannot fail the job
    assert "|| true" not in lint_cmds


def test_ci_run_runs_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_run = f.read()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no quick-start code block"
    commands = [
        line.strip() for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")
    ]
    assert len(commands) == 2, commands
    assert commands[1] in ci_run
