"""A small fake of the Hugging Face Hub HTTP API, enough for huggingface_hub 2.4's upload path.

Serves, on 127.0.0.1 and a random port (threaded http.server, HTTP/1.1 keep-alive):

- ``POST /api/repos/create``                         create_repo (409 when it exists)
- ``GET  /api/models/{repo}``                        repo_info (create_repo's exist_ok fallback on 401/403)
- ``POST /api/models/{repo}/branch/{branch}``        create_branch (409 when it exists)
- ``POST /api/models/{repo}/preupload/{rev}``        upload modes: LFS for binary suffixes or >= 1 MB, else regular
- ``POST /{repo}.git/info/lfs/objects/batch``         LFS batch: multipart above ``multipart_threshold`` (parts of
                                                      ``chunk_size``, then a completion POST), basic PUT below;
                                                      always a verify action; no actions when the object exists
- ``PUT  /lfs-upload/{oid}`` / ``PUT /lfs-upload/{oid}/part/{n}`` / ``POST /lfs-upload/{oid}/complete``
- ``POST /lfs-verify/{oid}``
- ``POST /api/validate-yaml``                        front matter must parse; base_model_relation checked
- ``POST /api/models/{repo}/commit/{rev}``           ndjson commit: regular files (base64) + lfsFile pointers,
                                                      each pointer must name an uploaded object of that size
- ``GET  /api/whoami-v2``, ``GET /api/agent-harnesses`` (huggingface_hub's user-agent telemetry, once per process)

Every received LFS object is checked against its sha256 oid (like the hub, a mismatch is a
400), and committed files are kept in memory so tests can compare what arrived with the
local files. Anything else is answered 404 and recorded in ``unexpected``.

Bounded: at most ``max_requests`` requests are served (later ones get a 400 and set
``overflow``), request bodies are capped, sockets time out after ``socket_timeout`` s, and
the server shuts itself down ``lifetime_s`` seconds after starting if a test forgets to.

Behaviour knobs: ``token`` (the only accepted bearer token), ``refuse`` (401 or 403 for
every authenticated request), ``failures`` (list of ``Failure``: method + path regex ->
status, for the first ``times`` matches or always); 5xx/429 failures carry
``Retry-After: <retry_after>`` so huggingface_hub's backoff waits 1 s per retry instead of
1, 2, 4, 8, 8 s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

MiB = 1 << 20
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf", ".h5", ".msgpack", ".onnx")
RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Failure:
    method: str
    path: str  # regex, searched in the request path
    status: int = 503
    times: int | None = None  # None = always
    hits: int = 0


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass
class Request:
    method: str
    path: str
    status: int
    authorized: bool
    at: float


class FakeHub:
    def __init__(
        self,
        token: str = "hf_fake_write_token",
        refuse: int | None = None,
        failures: list[Failure] | None = None,
        multipart_threshold: int = 4 * MiB,
        chunk_size: int = 4 * MiB,
        max_requests: int = 400,
        lifetime_s: float = 120.0,
        socket_timeout: float = 15.0,
        retry_after: int = 0,
        max_body: int = 64 * MiB,
    ):
        self.token, self.refuse, self.failures = token, refuse, list(failures or [])
        self.multipart_threshold, self.chunk_size = multipart_threshold, chunk_size
        self.max_requests, self.lifetime_s, self.retry_after, self.max_body = (
            max_requests,
            lifetime_s,
            retry_after,
            max_body,
        )
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> content, verified
        self.parts: dict[str, dict[int, bytes]] = {}
        self.requests: list[Request] = []
        self.unexpected: list[str] = []
        self.errors: list[str] = []  # server-side problems (bad hashes, missing objects...)
        self.overflow = False
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            fake = hub
            timeout = socket_timeout

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ helpers for tests
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[branch]) if repo_id in self.repos else {}

    def hits(self, method: str, pattern: str) -> int:
        return sum(1 for r in self.requests if r.method == method and re.search(pattern, r.path))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > self.fake.max_body:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.fake.max_body:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
        body = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self._status = status

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": message}, headers)

    def _handle(self, method: str) -> None:
        fake = self.fake
        path = urlsplit(self.path).path
        self._status = 0
        authorized = self.headers.get("Authorization") == f"Bearer {fake.token}"
        try:
            body = self._body()
        except (ValueError, OSError) as exc:
            self.close_connection = True
            return self._error(413, f"fake hub: {exc}")
        try:
            with fake.lock:
                count = len(fake.requests)
                if count >= fake.max_requests:
                    fake.overflow = True
            if count >= fake.max_requests:
                self.close_connection = True
                return self._error(400, "fake hub: request budget exhausted")
            for failure in fake.failures:
                if (
                    failure.method == method
                    and re.search(failure.path, path)
                    and (failure.times is None or failure.hits < failure.times)
                ):
                    with fake.lock:
                        failure.hits += 1
                    headers = (
                        {"Retry-After": str(fake.retry_after)} if failure.status in (429, 500, 502, 503, 504) else {}
                    )
                    return self._error(failure.status, f"fake hub: injected HTTP {failure.status}", headers)
            self._route(method, path, body, authorized)
        except Exception as exc:  # a bug in the fake must show up in the test, not hang it
            fake.errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            if not self._status:
                self._error(500, f"fake hub crashed: {exc}")
        finally:
            with fake.lock:
                fake.requests.append(Request(method, path, self._status, authorized, time.monotonic()))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # ------------------------------------------------------------ the API
    def _auth(self, authorized: bool) -> bool:
        """Hub-like refusals; True when the request may go on."""
        refuse = self.fake.refuse
        if refuse == 401 or not authorized:
            self._error(
                401,
                "Invalid credentials in Authorization header",
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
            return False
        if refuse == 403:
            self._error(403, "You don't have the rights to create a model under this namespace")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _route(self, method: str, path: str, body: bytes, authorized: bool) -> None:
        fake = self.fake
        routes = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("GET", rf"^/api/models/{_REPO}$", self._repo_info),
            ("POST", rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$", self._create_branch),
            ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", rf"^/{_REPO}\.git/info/lfs/objects/batch$", self._lfs_batch),
            ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", self._lfs_put),
            ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)$", self._lfs_part),
            ("POST", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})/complete$", self._lfs_complete),
            ("POST", r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$", self._lfs_verify),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", self._commit),
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("GET", r"^/api/agent-harnesses$", self._agent_harnesses),
        ]
        for verb, pattern, handler in routes:
            match = re.match(pattern, path)
            if verb == method and match:
                # presigned storage URLs carry no token; the harness registry is public
                needs_auth = not path.startswith("/lfs-upload/") and path != "/api/agent-harnesses"
                if needs_auth and not self._auth(authorized):
                    return
                return handler(body, **{k: unquote(v) for k, v in match.groupdict().items()})
        fake.unexpected.append(f"{method} {path}")
        self._error(404, f"fake hub: {method} {path} is not implemented")

    def _agent_harnesses(self, body):
        """huggingface_hub's user-agent telemetry fetches this registry once per process (empty here)."""
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, body):
        self._send(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})

    def _create_repo(self, body):
        data = json.loads(body)
        repo_id = f"{data.get('organization')}/{data['name']}"
        with self.fake.lock:
            if repo_id in self.fake.repos:  # the hub's 409 carries the url: create_repo(exist_ok=True) reads it
                return self._send(
                    409, {"error": "You already created this model repo", "url": f"{self.fake.url}/{repo_id}"}
                )
            private = data.get("visibility", "private" if data.get("private") else "public") == "private"
            self.fake.repos[repo_id] = Repo(private=private)
        self._send(200, {"url": f"{self.fake.url}/{repo_id}", "name": repo_id})

    def _repo_info(self, body, repo):
        info = self._repo(repo)
        if info:
            self._send(200, {"id": repo, "private": info.private, "sha": "0" * 40, "siblings": []})

    def _create_branch(self, body, repo, branch):
        info = self._repo(repo)
        if info is None:
            return
        with self.fake.lock:
            if branch in info.branches:
                return self._error(409, f"Reference refs/heads/{branch} already exists")
            info.branches[branch] = dict(info.branches["main"])
        self._send(200, {})

    def _preupload(self, body, repo, rev):
        if self._repo(repo) is None:
            return
        files = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= MiB or b"\x00" in sample
            files.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None}
            )
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, body, repo):
        if self._repo(repo) is None:
            return
        fake, data = self.fake, json.loads(body)
        objects = []
        for obj in data["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in fake.lfs:
                verify = {"href": f"{fake.url}/lfs-verify/{oid}"}
                if size > fake.multipart_threshold:
                    n = -(-size // fake.chunk_size)
                    header = {str(i + 1): f"{fake.url}/lfs-upload/{oid}/part/{i + 1}" for i in range(n)}
                    header["chunk_size"] = str(fake.chunk_size)
                    upload = {"href": f"{fake.url}/lfs-upload/{oid}/complete", "header": header}
                else:
                    upload = {"href": f"{fake.url}/lfs-upload/{oid}"}
                entry["actions"] = {"upload": upload, "verify": verify}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _store(self, oid: str, content: bytes) -> bool:
        if hashlib.sha256(content).hexdigest() != oid:
            self.fake.errors.append(f"LFS object {oid[:12]}: received content does not match its sha256")
            self._error(400, "sha256 mismatch")
            return False
        with self.fake.lock:
            self.fake.lfs[oid] = content
        return True

    def _lfs_put(self, body, oid):
        if self._store(oid, body):
            self._send(200, {})

    def _lfs_part(self, body, oid, part):
        with self.fake.lock:
            self.fake.parts.setdefault(oid, {})[int(part)] = body
        self._send(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_complete(self, body, oid):
        data = json.loads(body)
        parts = self.fake.parts.get(oid, {})
        numbers = [p["partNumber"] for p in data["parts"]]
        if data.get("oid") != oid or numbers != sorted(parts) or numbers != list(range(1, len(numbers) + 1)):
            self.fake.errors.append(f"LFS completion for {oid[:12]}: parts {numbers} vs received {sorted(parts)}")
            return self._error(400, "bad completion payload")
        for p in data["parts"]:
            if p["etag"] != f'"{hashlib.md5(parts[p["partNumber"]]).hexdigest()}"':
                return self._error(400, f"etag mismatch for part {p['partNumber']}")
        if self._store(oid, b"".join(parts[n] for n in numbers)):
            self._send(200, {})

    def _lfs_verify(self, body, oid):
        data = json.loads(body)
        content = self.fake.lfs.get(oid)
        if content is None or len(content) != data.get("size"):
            return self._error(404, "object not found")
        self._send(200, {})

    def _validate_yaml(self, body):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        errors = []
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
                relation = meta.get("base_model_relation")
                if relation is not None and relation not in RELATIONS:
                    errors.append(f'"base_model_relation" must be one of {list(RELATIONS)}')
            except yaml.YAMLError as exc:
                errors.append(f"invalid YAML: {exc}")
        if errors:
            return self._send(400, {"errors": [{"message": e} for e in errors]})
        self._send(200, {"errors": [], "warnings": []})

    def _commit(self, body, repo, rev):
        info = self._repo(repo)
        if info is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "commit payload must start with a header")
        if rev not in info.branches:
            return self._error(404, f"Invalid rev id: {rev}", {"X-Error-Code": "RevisionNotFound"})
        files: dict[str, bytes] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.fake.lfs.get(value["oid"])
                if content is None or ("size" in value and len(content) != value["size"]):
                    self.fake.errors.append(f"commit names LFS object {value['oid'][:12]} that was never uploaded")
                    return self._error(400, f"LFS object for {value['path']} is missing")
                files[value["path"]] = content
            else:
                return self._error(400, f"fake hub: unsupported commit operation {key!r}")
        oid = hashlib.sha1(body).hexdigest()
        with self.fake.lock:
            info.branches[rev].update(files)
            info.commits.append(
                {"oid": oid, "branch": rev, "summary": lines[0]["value"].get("summary"), "files": sorted(files)}
            )
        self._send(
            200,
            {
                "commitUrl": f"{self.fake.url}/{repo}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
                "success": True,
            },
        )
