"""A real multi-node Ray cluster on loopback, with token authentication on, for development and tests.

    with LocalCluster(num_workers=1, cpus_per_node=1) as c:
        c.address         # GCS address, for ray.init / `ray start --address`
        c.dashboard_url   # http://...: the Job Submission API (`minit2i submit`, `ray job submit`)
        c.token           # the shared secret every request must carry

    minit2i cluster up workers=2 cpus_per_node=2         # prints the env to export
    minit2i cluster status
    minit2i cluster down

Each node is a `ray start` of its own (head, then workers joining it), with its own temp dir and
its own ports, so the cluster lives beside any other Ray on the machine (the test session's
`ray_session`, a colleague's cluster). It never runs `ray stop`: that kills every Ray process of
the machine. Instead each `ray start` runs in a new session (setsid), and stopping kills exactly
the processes of those sessions, plus their descendants (job drivers start sessions of their own)
and anything whose command line names the cluster's temp dir.

Token authentication (Ray >= 2.52; in Ray 2.60 `ray start` turns it on only when told or when a
token file already exists): every node runs with RAY_AUTH_MODE=token and reads the token from
RAY_AUTH_TOKEN_PATH, a 0600 file in the cluster's temp dir. Ray's order of token sources is
RAY_AUTH_TOKEN (the value) > RAY_AUTH_TOKEN_PATH (a file) > ~/.ray/auth_token; RAY_AUTH_TOKEN is
removed from the nodes' environment so a stray value cannot override the cluster's file. HTTP
clients send `Authorization: Bearer <token>` (the dashboard answers 401 without it, 403 when
wrong); Ray's own clients (ray.init, `ray job submit`) find it through the same variables.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Ray rewrites a node address of 127.0.0.1/localhost to the machine's outward-facing IP
# (ray._private.services.resolve_ip_for_localhost), so the cluster would listen and talk on a
# non-loopback interface. Any other 127/8 address is kept verbatim and is still loopback on Linux.
LOOPBACK = "127.0.0.2"

# Environment a node or client must not inherit: it would point Ray at another cluster or token.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                    "RAY_AUTH_MODE", "RAY_JOB_HEADERS")
DEFAULT_STATE = Path.home() / ".minit2i" / "local-cluster.json"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class ClusterState:
    """What a started cluster needs to be found again (written to a JSON file by `cluster up`)."""

    root: str                                       # temp dir holding the nodes' dirs and the token file
    host: str
    gcs_port: int
    dashboard_port: int
    num_workers: int
    sessions: list[int] = field(default_factory=list)  # session ids (= pids of the `ray start`s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def token_path(self) -> str:
        return os.path.join(self.root, "auth_token")


class LocalCluster:
    """Head + `num_workers` worker nodes on loopback, each a separate `ray start` with its own CPUs."""

    def __init__(
        self,
        num_workers: int = 1,
        cpus_per_node: int = 1,
        head_cpus: int | None = None,
        token: str | None = None,
        object_store_memory: int | None = None,
        host: str = LOOPBACK,
        start_timeout: float = 180.0,
    ):
        if num_workers < 0 or cpus_per_node < 0:
            raise ValueError(f"LocalCluster: num_workers={num_workers} and cpus_per_node={cpus_per_node} must be >= 0")
        self.num_workers, self.cpus_per_node = num_workers, cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus
        self.object_store_memory = object_store_memory
        self.host, self.start_timeout = host, start_timeout
        self._token = token or secrets.token_hex(32)
        self.state: ClusterState | None = None

    # -- what clients need -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._started().address

    @property
    def dashboard_url(self) -> str:
        return self._started().dashboard_url

    @property
    def token(self) -> str:
        return self._token

    @property
    def token_path(self) -> str:
        return self._started().token_path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with Ray pointed at this cluster and its token: for
        subprocesses such as `ray job submit`, `ray status` or a driver calling ray.init()."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_RAY_ENV}
        env.update(
            RAY_ADDRESS=self.address,                # ray.init(), `ray status`
            RAY_API_SERVER_ADDRESS=self.dashboard_url,  # `ray job ...` (read before RAY_ADDRESS)
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.token_path,
        )
        return env

    def _started(self) -> ClusterState:
        if self.state is None:
            raise RuntimeError("LocalCluster is not started (use it as a context manager or call start())")
        return self.state

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        """Start the head and the workers; a start that fails is stopped and tried once more on new
        ports (a port `free_port` chose can be taken by another process before Ray binds it, and a
        loaded machine can miss one of Ray's own start-up waits)."""
        try:
            return self._start_once()
        except RuntimeError as err:
            print(f"cluster: start failed, trying once more on new ports: {str(err).splitlines()[0]}", file=sys.stderr)
        return self._start_once()

    def _start_once(self) -> "LocalCluster":
        # A short root: Ray puts unix sockets under it, and their paths must stay under ~107 bytes.
        root = tempfile.mkdtemp(prefix="m2r-", dir="/tmp")
        self.state = ClusterState(root=root, host=self.host, gcs_port=free_port(self.host),
                                  dashboard_port=free_port(self.host), num_workers=self.num_workers)
        token_path = Path(self.state.token_path)
        token_path.touch(mode=0o600)
        token_path.write_text(self._token)
        try:
            self._ray_start("head", self.head_cpus, [
                "--head", "--port", str(self.state.gcs_port),
                "--dashboard-host", self.host, "--dashboard-port", str(self.state.dashboard_port),
                "--ray-client-server-port", str(free_port(self.host)),
                "--include-dashboard", "true",
            ])
            for i in range(self.num_workers):
                self._ray_start(f"worker{i + 1}", self.cpus_per_node, ["--address", self.state.address])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _ray_start(self, name: str, num_cpus: int, args: list[str]) -> None:
        state = self.state
        temp_dir = os.path.join(state.root, name)
        cmd = [*_ray_cli(), "start", *args,
               "--node-ip-address", self.host, "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--temp-dir", temp_dir,
               # Ports other Ray instances on the machine may also want: a fresh one per node, and
               # OS-assigned worker ports instead of the shared default range 10002-19999.
               "--dashboard-agent-listen-port", str(free_port(self.host)),
               "--min-worker-port", "0", "--max-worker-port", "0",
               "--disable-usage-stats"]
        if self.object_store_memory:
            cmd += ["--object-store-memory", str(self.object_store_memory)]
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RAY_ENV}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=state.token_path,
            RAY_USAGE_STATS_ENABLED="0",
            # Job entrypoints (`minit2i ...`, `python ...`) resolve to this interpreter's environment.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        log_path = os.path.join(state.root, f"ray-start-{name}.log")
        with open(log_path, "wb") as log:
            # A new session per node: stop() finds the node's processes by their session id.
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            state.sessions.append(proc.pid)
            try:
                rc = proc.wait(timeout=self.start_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
        if rc != 0:
            # The lines that say what went wrong, not the dashboard's module listing.
            lines = Path(log_path).read_text(errors="replace").splitlines()
            tail = "\n".join([line for line in lines if " INFO " not in line][-40:])[-3000:]
            what = "timed out" if rc is None else f"exited {rc}"
            raise RuntimeError(f"`ray start` for node {name} {what} (log {log_path}):\n{tail}")

    def add_worker(self) -> None:
        """Start one more worker node (e.g. in place of a lost one) and wait until it is alive."""
        state = self._started()
        # The new node is told apart by its id, not by the count of alive nodes: a node killed just
        # before (a lost spot instance) can still count as alive until Ray's health checks fail it,
        # and then the count does not grow when its replacement joins.
        before = alive_node_ids(self.dashboard_url, self._token)
        state.num_workers += 1
        try:
            self._ray_start(f"worker{state.num_workers}", self.cpus_per_node, ["--address", state.address])
        except RuntimeError as err:      # as in start(): once more, as a new node
            print(f"cluster: worker{state.num_workers} failed to start, trying once more: {str(err).splitlines()[0]}",
                  file=sys.stderr)
            state.num_workers += 1
            self._ray_start(f"worker{state.num_workers}", self.cpus_per_node, ["--address", state.address])
        deadline = time.monotonic() + self.start_timeout
        while not alive_node_ids(self.dashboard_url, self._token) - before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker{state.num_workers} not alive after {self.start_timeout:.0f}s")
            time.sleep(0.5)

    def _wait_ready(self) -> None:
        """Until the dashboard answers with the token and every node is alive."""
        deadline = time.monotonic() + self.start_timeout
        want = self.num_workers + 1
        alive, last_error = 0, ""
        while time.monotonic() < deadline:
            try:
                alive = len(alive_nodes(self.dashboard_url, self._token))
                if alive >= want:
                    return
            except (OSError, ValueError, KeyError) as err:  # not up yet, or answering half-started
                last_error = str(err)
            time.sleep(0.5)
        raise RuntimeError(f"local cluster not ready after {self.start_timeout:.0f}s: {alive}/{want} nodes alive {last_error}")

    def stop(self) -> None:
        if self.state is None:
            return
        stop_processes(self.state)
        shutil.rmtree(self.state.root, ignore_errors=True)
        self.state = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state file, for the CLI --------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self._started()), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LocalCluster":
        try:
            state = ClusterState(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no local cluster state at {path} (start one with `minit2i cluster up`)") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a local cluster state file: {err}") from err
        token = Path(state.token_path).read_text() if os.path.exists(state.token_path) else None
        cluster = cls(num_workers=state.num_workers, token=token, host=state.host)
        cluster.state = state
        return cluster


# -- processes ------------------------------------------------------------------------------------


def cluster_processes(state: ClusterState) -> list:
    """Live processes of the cluster: those whose command line names the cluster's temp dir, the rest
    of the node sessions they belong to, and all their descendants (job drivers run in sessions of
    their own). Never this process or its ancestors."""
    import psutil  # a Ray dependency

    protected = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    marker = state.root.rstrip("/") + "/"
    by_session: dict[int, list[psutil.Process]] = {}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            by_session.setdefault(os.getsid(proc.pid), []).append(proc)
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    # A recorded session counts only while one of its processes names the temp dir: the `ray start`
    # that led it has exited, so its id may since have been reused by an unrelated session.
    confirmed = {sid for sid in state.sessions if any(p.pid in found for p in by_session.get(sid, ()))}
    for sid in confirmed:
        found.update((p.pid, p) for p in by_session[sid])
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return [p for pid, p in found.items() if pid not in protected and _alive(p)]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_processes(state: ClusterState, grace: float = 4.5) -> None:
    """Terminate the cluster's processes in `ray stop`'s order: raylets first (workers and agents
    exit with them), then everything else, the GCS last; SIGKILL what outlives the grace period."""
    import psutil

    def rank(proc) -> int:
        try:
            name = proc.name()
        except psutil.Error:
            return 1
        return 0 if name == "raylet" else 2 if name == "gcs_server" else 1

    for _ in range(3):  # a second pass catches what was spawned while the first one ran
        procs = cluster_processes(state)
        if not procs:
            return
        for level in (0, 1, 2):
            group = [p for p in procs if rank(p) == level]
            for p in group:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(group, timeout=grace / 3)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=2)
    left = cluster_processes(state)
    if left:
        raise RuntimeError(f"could not stop local cluster processes: {[p.pid for p in left]}")


# -- dashboard queries --------------------------------------------------------------------------------


def dashboard_get(url: str, token: str | None, timeout: float = 10.0) -> dict:
    """GET a dashboard JSON endpoint with the bearer token; HTTP errors become ValueError/OSError."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise ValueError(f"{url}: HTTP {err.code} {err.read()[:200].decode(errors='replace')}") from None


def alive_nodes(dashboard_url: str, token: str | None) -> list[dict]:
    """Alive nodes from the state API (/api/v0/nodes): node_ip, resources_total, is_head_node, ..."""
    body = dashboard_get(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=1", token)
    return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def alive_node_ids(dashboard_url: str, token: str | None) -> set[str]:
    return {n["node_id"] for n in alive_nodes(dashboard_url, token)}


# -- `minit2i cluster up|down|status` ---------------------------------------------------------------


def _default_state() -> str:
    return os.environ.get("MINIT2I_CLUSTER_STATE", str(DEFAULT_STATE))


@dataclass
class ClusterCommandConfig:
    state: str = field(default_factory=_default_state)   # state file of the running cluster ($MINIT2I_CLUSTER_STATE)
    workers: int = 1                     # worker nodes besides the head (up)
    cpus_per_node: int = 1               # logical CPUs each worker node offers (up)
    head_cpus: int | None = None         # logical CPUs of the head (up; default cpus_per_node)
    object_store_mb: int | None = None   # object store per node in MiB (up; default Ray's)
    token_file: str | None = None        # use the token in this file (up; default a new random token)


def up(args: ClusterCommandConfig) -> int:
    state_path = Path(args.state)
    if state_path.exists():
        existing = LocalCluster.load(state_path)
        if cluster_processes(existing.state):
            raise ValueError(f"a local cluster is already running ({state_path}); `minit2i cluster down` first")
        state_path.unlink()
    if args.token_file and not Path(args.token_file).is_file():
        raise FileNotFoundError(f"token_file {args.token_file} does not exist")
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    if args.token_file and not token:
        raise ValueError(f"token file {args.token_file} is empty")
    cluster = LocalCluster(num_workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
                           token=token,
                           object_store_memory=args.object_store_mb * 2**20 if args.object_store_mb else None)
    cluster.start()
    cluster.save(state_path)
    print(f"local Ray cluster up: head + {args.workers} worker node(s); state {state_path}")
    _print_env(cluster)
    return 0


def down(args: ClusterCommandConfig) -> int:
    state_path = Path(args.state)
    LocalCluster.load(state_path).stop()
    state_path.unlink(missing_ok=True)
    print("local Ray cluster stopped")
    return 0


def status(args: ClusterCommandConfig) -> int:
    cluster = LocalCluster.load(Path(args.state))
    try:
        nodes = alive_nodes(cluster.dashboard_url, cluster.token)
    except (OSError, ValueError) as err:
        print(f"local Ray cluster at {cluster.dashboard_url} not answering: {err}", file=sys.stderr)
        return 1
    print(f"dashboard {cluster.dashboard_url}  GCS {cluster.address}  {len(nodes)} node(s) alive")
    for node in sorted(nodes, key=lambda n: not n.get("is_head_node")):
        cpus = node.get("resources_total", {}).get("CPU", 0)
        print(f"  {'head  ' if node.get('is_head_node') else 'worker'} {node['node_id'][:12]}  CPU {cpus:g}")
    _print_env(cluster)
    return 0 if len(nodes) == cluster.state.num_workers + 1 else 1


def _print_env(cluster: LocalCluster) -> None:
    print("# point Ray clients (ray job submit, ray status, minit2i submit) at it:")
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        print(f"export {key}={cluster.env({})[key]}")
