"""`minit2i submit`: run a minit2i command on a Ray cluster through Ray's Job Submission API.

    minit2i submit --address http://HEAD:8265 working_dir=. -- train --config jobs/configs/b16_pretrain.yaml
    minit2i submit -- minit2i demo            # address and token from the environment

The job's entrypoint is `minit2i <command...>` on the cluster, exactly what
`ray job submit --address URL --working-dir . -- minit2i <command...>` runs; this command adds the
token handling, a check that the command exists, log streaming, and the job's exit status as its
own exit code (0 when the job succeeded, the driver's exit code when it failed).

Address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the dashboard URL,
http://HEAD:8265; a ray:// client address works too).
Token: token=, else token_file=, else Ray's own sources in Ray's order: RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. It travels as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# Uploading a checkout: never these (Ray already skips what .gitignore lists).
DEFAULT_EXCLUDES = [".git", ".venv", "__pycache__", "*.pyc", "runs", "outputs"]


def resolve_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The token to send, or None when there is none. Read here rather than left to Ray's client,
    which adds it only when this process itself runs with RAY_AUTH_MODE=token."""
    if token:
        return token
    if token_file:
        value = Path(token_file).read_text().strip()
        if not value:
            raise ValueError(f"token file {token_file} is empty")
        return value
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        value = Path(path).read_text().strip() if os.path.exists(path) else ""
        if not value:  # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal, not as "no token"
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is missing or empty")
        return value
    default = Path.home() / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.exists() else None


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return address


def entrypoint(command: list[str]) -> str:
    """`minit2i <command>` as one shell-quoted string; the command must be a known subcommand."""
    from jobs.cli import COMMANDS

    if command and command[0] == "minit2i":
        command = command[1:]
    if not command:
        raise ValueError("nothing to submit: give a minit2i command after `--`, e.g. `minit2i submit -- demo`")
    if command[0] not in COMMANDS:
        raise ValueError(f"unknown minit2i command {command[0]!r} (known: {', '.join(COMMANDS)})")
    return "minit2i " + shlex.join(command)


@contextlib.contextmanager
def _env_without(*names: str):
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address
    # (ray.dashboard.utils.get_address_for_submission_client); hide them while it is built so the
    # address resolved above is the one used.
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _env_without("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise PermissionError(f"cluster at {address} refused the request: {err}") from None


def submit(
    command: list[str],
    address: str | None = None,
    token: str | None = None,
    working_dir: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    wait: bool = True,
    out: TextIO = sys.stdout,
) -> int:
    """Submit `minit2i <command>`; stream its logs to `out` and return its exit status (or, with
    wait=False, 0 once it is accepted)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus

    address = resolve_address(address)
    runtime_env = dict(runtime_env or {})
    if working_dir:
        if "://" not in working_dir and not os.path.isdir(working_dir):
            raise ValueError(f"working_dir {working_dir} is not a directory")
        runtime_env["working_dir"] = working_dir
        if "://" not in working_dir:
            runtime_env.setdefault("excludes", DEFAULT_EXCLUDES)
    client = connect(address, token)
    try:
        job_id = client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env or None)
    except AuthenticationError as err:
        raise PermissionError(f"cluster at {address} refused the request: {err}") from None
    except RuntimeError as err:  # the SDK's HTTP errors (bad runtime env, upload refused, ...)
        raise OSError(f"job submission to {address} failed: {err}") from None
    print(f"minit2i submit: job {job_id} submitted to {address}", file=sys.stderr, flush=True)
    if not wait:
        return 0

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
        # The log stream closes when the driver exits; the status may lag it by a moment.
        deadline = time.monotonic() + 60
        while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nminit2i submit: detached; job {job_id} keeps running (`ray job stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"minit2i submit: job {job_id} {info.status.value}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr)
    if status == JobStatus.SUCCEEDED:
        return 0
    if status == JobStatus.FAILED and info.driver_exit_code:
        return info.driver_exit_code
    return 1


@dataclass
class SubmitConfig:
    address: str | None = None           # dashboard URL http://HEAD:8265 (--address; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)
    token: str | None = None             # auth token; prefer token_file: argv is visible to other users
    token_file: str | None = None        # file holding the auth token (default $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    working_dir: str | None = None       # local dir (or remote URI) uploaded as the job's working dir
    runtime_env: dict | None = None      # runtime env, e.g. runtime_env={env_vars: {A: "1"}}
    wait: bool = True                    # stream the logs and wait for the job (false: return once accepted)


def run(args: SubmitConfig, command: list[str]) -> int:
    """`command` is what followed `--`: a minit2i command line."""
    if args.token_file and not Path(args.token_file).is_file():
        raise FileNotFoundError(f"token_file {args.token_file} does not exist")
    return submit(command, address=args.address, token=resolve_token(args.token, args.token_file),
                  working_dir=args.working_dir, runtime_env=args.runtime_env, wait=args.wait)
