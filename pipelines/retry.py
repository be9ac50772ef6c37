"""One retry policy for every stage: storage calls and shard tasks back off the same way.

Cloud storage fails for a while and then works again: throttling (503 SlowDown), a region outage
(500/503 for minutes), a connection cut mid-answer, a timeout. Those are *transient*: the same call
later succeeds. AccessDenied, NoSuchBucket, a missing key or bad input are *permanent*: retrying only
delays the one line that says what is wrong. `call` retries transient errors with exponential
backoff and full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015: each wait is
uniform in [0, min(max_delay, first_delay * 2**n)], after a first wait of at least `first_delay`)
until the policy's time budget is spent, then raises `StorageUnavailable`, which the command line
reports as resumable (exit 75, EX_TEMPFAIL): committed work is kept and the same command resumes.

The default budget (10 minutes) outlasts a 5-minute outage with room for the longest single wait
(`max_delay`). It is set in one place, the MINIT2I_RETRY environment variable
(`budget=600,first_delay=0.5,max_delay=30`, any subset), which reaches Ray workers two ways: a job's
`ray.init` passes it in the runtime_env (jobs/ray_init.py), and shard tasks carry the driver's policy
and stage name with them (`carried`), so a worker started before the variable changed still obeys it.

Hand-written: tenacity and backoff retry by attempt count or wall time but know nothing of S3 error
codes, the stage name the lines must carry, or carrying a policy into Ray tasks; botocore's own
retries stop after a fixed count (`total_max_attempts`) and say nothing while they wait.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

ENV = "MINIT2I_RETRY"
STAGE_ENV = "MINIT2I_STAGE"  # the command's name, set by the command line; names the stage in retry lines
EXIT_RESUMABLE = 75          # EX_TEMPFAIL (sysexits.h): "temporary failure, try again later"
RESUME_HINT = "committed work is kept; run the same command again to resume"


@dataclass(frozen=True)
class RetryPolicy:
    budget: float = 600.0        # seconds one operation keeps retrying transient errors before giving up
    first_delay: float = 0.5     # seconds: the ceiling of the first wait
    max_delay: float = 30.0      # seconds: the ceiling of any one wait (bounds the time to notice recovery)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Wait before attempt `attempt + 1` (attempt counts from 1): full jitter, at least 10% of the ceiling."""
        ceiling = min(self.max_delay, self.first_delay * 2 ** (attempt - 1))
        return ceiling * (0.1 + 0.9 * rng.random())

    def to_env(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self))

    @classmethod
    def from_env(cls, text: str) -> "RetryPolicy":
        values: dict[str, float] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = item.partition("=")
            if key not in names:
                raise ValueError(f"{ENV}: unknown key {key!r} in {text!r} (keys: {', '.join(sorted(names))})")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{ENV}: {key}={value!r} is not a number of seconds") from None
        policy = cls(**values)
        if min(policy.budget, policy.first_delay, policy.max_delay) < 0:
            raise ValueError(f"{ENV}: {text!r} has a negative number of seconds")
        return policy


class Resumable(Exception):
    """A failure that leaves committed work in place: re-running the same command resumes the job."""


class StorageUnavailable(Resumable, OSError):
    """A storage call still failing with transient errors when the retry budget ran out."""


# Set for the duration of a stage (`stage`) or a carried task; module globals rather than contextvars
# because a shard task's storage calls may run on its pool threads.
_policy: RetryPolicy | None = None
_stage: str = ""


def policy() -> RetryPolicy:
    """The policy in force: a carried/overridden one, else MINIT2I_RETRY, else the defaults."""
    if _policy is not None:
        return _policy
    return RetryPolicy.from_env(os.environ.get(ENV, ""))


def stage_name() -> str:
    return _stage or os.environ.get(STAGE_ENV) or "storage"


class using:
    """`with using(stage="fetch", policy=p):` sets the stage name (and policy) for the calls inside."""

    def __init__(self, stage: str | None = None, policy: RetryPolicy | None = None):
        self.stage, self.policy = stage, policy

    def __enter__(self) -> "using":
        global _policy, _stage
        self._saved = (_policy, _stage)
        if self.policy is not None:
            _policy = self.policy
        if self.stage is not None:
            _stage = self.stage
        return self

    def __exit__(self, *exc) -> None:
        global _policy, _stage
        _policy, _stage = self._saved


def in_stage(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: the function's storage calls (in a driver or a Ray worker) name stage `name`."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            with using(stage=name):
                return fn(*args, **kwargs)

        return run

    return wrap


def carried(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` wrapped to run under the caller's policy and stage name, wherever it runs (a Ray task)."""
    state = (policy(), stage_name())

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        with using(stage=state[1], policy=state[0]):
            return fn(*args, **kwargs)

    return run


def runtime_env_vars() -> dict[str, str]:
    """The environment a job's Ray workers need so their policy and stage name are the driver's."""
    return {k: os.environ[k] for k in (ENV, STAGE_ENV) if os.environ.get(k)}


# ---------------------------------------------------------------------------------------------
# Transient or permanent

_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "BandwidthLimitExceeded",
    "EC2ThrottledException", "PriorRequestNotComplete",
})
# pyarrow (the AWS C++ SDK) reports S3 errors as OSError text only.
_TRANSIENT_TEXT = re.compile(
    r"SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTL|REQUEST_TIMEOUT|NETWORK_CONNECTION|HTTP status 5\d\d"
    r"|curlCode|Connection reset|connection was reset|Broken pipe|Connection refused|timed out|Timeout",
    re.IGNORECASE,
)


def is_transient(err: BaseException) -> bool:
    """Whether the same call may succeed later (throttling, 5xx, cut connections, timeouts)."""
    if isinstance(err, StorageUnavailable):
        return False                                   # already retried for a whole budget
    try:
        import botocore.exceptions as bx
    except ImportError:                                # pragma: no cover - boto3 is a dependency
        bx = None
    if bx is not None:
        if isinstance(err, bx.ClientError):
            meta = err.response.get("ResponseMetadata", {})
            code = err.response.get("Error", {}).get("Code", "")
            status = int(meta.get("HTTPStatusCode") or 0)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(err, (bx.ConnectionError, bx.HTTPClientError, bx.ResponseStreamingError)):
            return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.ENOENT):
        return False
    if isinstance(err, (FileNotFoundError, PermissionError, ValueError, KeyError, TypeError)):
        return False
    return isinstance(err, OSError) and bool(_TRANSIENT_TEXT.search(str(err)))


def describe(err: BaseException) -> str:
    """The underlying error in one line: S3's code and message, or the exception's own text."""
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        e = response["Error"]
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{e.get('Code', '?')}: {e.get('Message', '')}".strip() + (f" (HTTP {status})" if status else "")
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def call(fn: Callable[[], T], what: str, *, rng: random.Random | None = None,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on transient errors under the policy; `what` names the operation and object
    ("PUT s3://bucket/key") in each retry line and in the final error."""
    p = policy()
    rng = rng or random.Random()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below; permanent ones re-raised as they are
            if not is_transient(err):
                raise
            used = time.monotonic() - start
            wait = p.delay(attempt, rng)
            if used + wait > p.budget:
                raise StorageUnavailable(
                    f"{stage_name()}: {what} still failing after {attempt} attempts in {used:.0f}s (retry budget "
                    f"{p.budget:g}s, {ENV}): {describe(err)}"
                ) from err
            print(f"{stage_name()}: {what} failed ({describe(err)}); retry {attempt} in {wait:.1f}s "
                  f"({used:.0f}s of the {p.budget:g}s budget used)", file=sys.stderr, flush=True)
            sleep(wait)


def resubmit_delay(attempt: int, rng: random.Random | None = None) -> float:
    """How long to wait before resubmitting a failed task for its attempt `attempt + 1`."""
    return policy().delay(attempt, rng or random.Random())
