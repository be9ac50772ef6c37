"""Safe HTTP GET for untrusted URL lists: which addresses may be contacted, and a client that obeys it.

A public URL list (CC12M: 12.4M URLs from the open web) is untrusted input. Fetching it from inside
a cluster must not turn the cluster into a proxy onto its own network (SSRF): the cloud metadata
service (169.254.169.254 hands out instance credentials), the Ray dashboard on loopback, private
services. So, by default:

- only http and https URLs are fetched;
- the host is resolved once, every resolved address is checked, and the connection is made to the
  checked address itself (no second DNS lookup an attacker could answer differently);
- redirects are followed here, one hop at a time, each hop checked like the first URL;
- the user may allow hosts by name or CIDR (`allow_hosts=[127.0.0.1]` for a loopback test server;
  127.0.0.2 stays forbidden then).

Why not urllib (what img2dataset's `download_image` uses): `urlopen` resolves names and follows
redirects internally, so a check before the call is not a check of what it connects to, and it
reads the whole body with no size cap. The client below is plain `http.client` with those three
things added: a pinned address, manual redirects, a byte cap and an overall deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, AWS over IPv6, ECS task metadata, Alibaba).
# Most are link-local anyway; naming them gives the refusal a precise reason.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address

# Failure classes worth another try later; everything else (404, 410, refusals, bad images) is
# final. See `pipelines.fetch` for the full list of classes.
RETRYABLE = frozenset({"timeout", "http_429", "http_5xx", "connection"})

_USER_AGENT = "Mozilla/5.0 (compatible; minit2i-fetch/0.1; +https://github.com/rom1504/img2dataset)"
_CHUNK = 64 << 10


@dataclass(frozen=True)
class AllowList:
    """Hosts the user allows despite the address policy: exact names, `.suffix` names, CIDRs."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: list[str] | tuple[str, ...] | None) -> "AllowList":
        names, networks = set(), []
        for entry in entries or ():
            entry = str(entry).strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))  # "127.0.0.1" -> /32
            except ValueError:
                if "/" in entry or " " in entry:
                    raise ValueError(f"allow_hosts entry {entry!r} is neither a host name nor a CIDR") from None
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.names or any(n.startswith(".") and host.endswith(n) for n in self.names)

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress | str, allow: AllowList = AllowList()) -> str | None:
    """Why `ip` may not be contacted ("loopback", "private", "metadata", ...), or None if it may.

    The decision function itself, so tests can check private, link-local and metadata addresses
    without ever sending a packet to them.
    """
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if allow.allows_ip(ip):
        return None
    inner = _embedded_ipv4(ip)
    if inner is not None:
        reason = address_refusal(inner, allow)
        return None if reason is None else f"{reason} (via {ip})"
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if not ip.is_global:  # shared address space (100.64/10), documentation, benchmarking, reserved
        return "reserved"
    return None


@dataclass
class SafetyPolicy:
    """What a fetch may do: where it may connect, how long, how many bytes, which opt-outs count."""

    allow: AllowList = AllowList()
    timeout: float = 10.0                 # seconds per socket operation, and for the whole response
    max_bytes: int = 20 << 20             # body cap per response
    max_redirects: int = 5
    user_agent_token: str = "minit2i"     # the token X-Robots-Tag directives may be addressed to
    disallowed_header_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


@dataclass
class Response:
    """The outcome of one safe GET: a body, or a status ("failed"/"refused") with a class and error."""

    body: bytes | None
    status: str            # "ok" (body present), "failed" or "refused"
    status_class: str      # "ok", "http_404", "timeout", "forbidden_address", ...
    error: str = ""
    bytes_read: int = 0
    content_type: str = ""


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a pre-checked address; `host` still goes into the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked address, with SNI and certificate checks against the host name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _is_disallowed():
    """img2dataset's X-Robots-Tag check, imported on first use: importing img2dataset pulls in its
    whole CLI (webdataset, torch), which the driver never needs and a worker pays for only once."""
    from img2dataset.downloader import is_disallowed

    return is_disallowed


def _resolve(host: str, port: int, policy: SafetyPolicy) -> tuple[str | None, Response | None]:
    """(address to connect to, None) or (None, refusal/failure). Every resolved address must pass."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as err:
        retry = err.errno == socket.EAI_AGAIN  # temporary resolver failure; NXDOMAIN is final
        return None, Response(None, "failed", "connection" if retry else "dns", f"cannot resolve {host}: {err}")
    addresses = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))  # IPv4 first, stable
    by_name = policy.allow.allows_name(host)
    for address in addresses:
        reason = None if by_name else address_refusal(address.split("%")[0], policy.allow)
        if reason is not None:
            where = f"address {address}" if address == host.strip("[]") else f"{host} resolves to {address}"
            return None, Response(None, "refused", "forbidden_address", f"{where} ({reason})")
    return addresses[0], None


def _target(url: str) -> str:
    """Path and query as sent on the request line; unsafe characters percent-encoded as browsers do."""
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return path + (f"?{query}" if query else "")


def _http_class(code: int) -> str:
    if code in (404, 410, 429):
        return f"http_{code}"
    if 500 <= code < 600:
        return "http_5xx"
    if 400 <= code < 500:
        return "http_4xx"
    return "http_other"


def _read_capped(resp: http.client.HTTPResponse, policy: SafetyPolicy, deadline: float) -> Response:
    declared = resp.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        return Response(None, "refused", "too_large", f"Content-Length {declared} over the {policy.max_bytes}-byte cap")
    chunks, total = [], 0
    while True:
        # Each read waits at most `timeout` (socket timeout); the deadline bounds a slow drip.
        chunk = resp.read1(_CHUNK) if hasattr(resp, "read1") else resp.read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > policy.max_bytes:
            return Response(None, "refused", "too_large", f"body over the {policy.max_bytes}-byte cap", total)
        if time.monotonic() > deadline:
            return Response(None, "failed", "timeout", f"response took over {policy.timeout}s", total)
        chunks.append(chunk)
    return Response(b"".join(chunks), "ok", "ok", "", total, resp.getheader("Content-Type", ""))


def safe_get(url: str, policy: SafetyPolicy) -> Response:
    """GET `url` under `policy`, following redirects by hand. Never raises for network errors."""
    seen = {url}
    deadline = time.monotonic() + policy.timeout
    for hop in range(policy.max_redirects + 1):
        resp = _get_once(url, policy, deadline)
        if isinstance(resp, Response):
            if hop and resp.status == "refused":
                resp.error = f"redirect to {url}: {resp.error}"
            return resp
        url = resp  # a redirect: the next URL, checked from scratch on the next hop
        if url in seen:
            return Response(None, "failed", "redirect_loop", f"redirect loop at {url}")
        seen.add(url)
    return Response(None, "failed", "too_many_redirects", f"more than {policy.max_redirects} redirects")


def _get_once(url: str, policy: SafetyPolicy, deadline: float) -> Response | str:
    """One request: a final Response, or the absolute URL a redirect points to."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        return Response(None, "failed", "bad_url", f"malformed URL {url!r}: {err}")
    if parts.scheme not in ("http", "https"):
        return Response(None, "refused", "forbidden_scheme", f"scheme {parts.scheme or '(none)'!r} in {url!r}; only http and https are fetched")
    host = parts.hostname
    if not host:
        return Response(None, "failed", "bad_url", f"no host in {url!r}")
    port = port or (443 if parts.scheme == "https" else 80)
    if time.monotonic() > deadline:
        return Response(None, "failed", "timeout", f"redirects took over {policy.timeout}s")
    ip, refusal = _resolve(host, port, policy)
    if refusal is not None:
        return refusal
    conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(host, port, ip, timeout=policy.timeout)
    try:
        conn.request("GET", _target(url), headers={
            "User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity", "Connection": "close",
        })
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            if not location:
                return Response(None, "failed", "bad_redirect", f"HTTP {resp.status} without Location from {url}")
            return urljoin(url, location.strip())
        if resp.status != 200:
            return Response(None, "failed", _http_class(resp.status), f"HTTP {resp.status} {resp.reason}")
        if policy.disallowed_header_directives and _is_disallowed()(
            resp.headers, policy.user_agent_token, policy.disallowed_header_directives
        ):
            return Response(None, "refused", "robots_optout", "use disallowed by X-Robots-Tag: " +
                            ", ".join(resp.headers.get_all("X-Robots-Tag", [])))
        return _read_capped(resp, policy, deadline)
    except (TimeoutError, socket.timeout) as err:
        return Response(None, "failed", "timeout", f"timed out after {policy.timeout}s: {err}")
    except ssl.SSLCertVerificationError as err:
        return Response(None, "failed", "tls", f"TLS certificate rejected: {err.verify_message or err}")
    except (OSError, http.client.HTTPException) as err:
        return Response(None, "failed", "connection", f"{type(err).__name__}: {err}")
    finally:
        conn.close()
