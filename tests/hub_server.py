"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1 in a thread.

It speaks the endpoints huggingface_hub 2.x uses to create a repo, upload a folder (preupload, the
LFS batch API with basic PUT transfers, NDJSON commits, README validation, branches, pull requests)
and read it back (repo info, tree, HEAD/GET on resolve). File contents are stored on disk by sha256.
Writes need `Authorization: Bearer <token>`; private repos need it for reads too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass
class Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N → commit
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit → tree
    pulls: int = 0


class HubServer:
    """Start with `with HubServer(root, token) as hub:`; hub.url is the endpoint."""

    def __init__(self, root: Path, token: str):
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.fail_commits = 0  # answer this many coming commit requests with 500
        self.echo_headers = False  # error replies quote the request's headers (Authorization too), as some servers do
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at a revision, as bytes."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.refs[revision]]
        return {path: (self.objects / e.sha256).read_bytes() for path, e in tree.items()}

    # ---- storage ---------------------------------------------------------------------------------

    def store(self, data: bytes, lfs: bool) -> Entry:
        sha = hashlib.sha256(data).hexdigest()
        (self.objects / sha).write_bytes(data)
        return Entry(sha, len(data), _git_oid(data), lfs)

    def commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], message: str) -> str:
        content = json.dumps([parent, message, sorted((path, e.sha256) for path, e in tree.items())])
        oid = hashlib.sha1(content.encode()).hexdigest()
        repo.commits[oid] = tree
        return oid


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", "repo_info"),
        ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree"),
        ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ]

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body()
        with self.hub.lock:
            self.hub.requests.append(f"{method} {url.path}")
        for route_method, pattern, name in self.routes:
            match = re.fullmatch(pattern, url.path)
            if route_method == method and match:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    with self.hub.lock:
                        status, payload, headers = getattr(self, name)(body, **params)
                except HttpError as e:
                    status, payload, headers = e.status, {"error": self._error_text(str(e))}, {"X-Error-Code": e.code} if e.code else {}
                return self._send(status, payload, headers, head=method == "HEAD")
        self._send(404, {"error": self._error_text(f"no route for {method} {url.path}")}, {})

    def _error_text(self, message: str) -> str:
        if not self.hub.echo_headers:
            return message
        return f"{message}; request headers: {dict(self.headers.items())}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, headers: dict, head: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    # ---- access ----------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_token(self) -> None:
        if not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HttpError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _head(self, repo: Repo, rev: str) -> str:
        if rev in repo.commits:
            return rev
        if rev not in repo.refs:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.refs[rev]

    # ---- writing ---------------------------------------------------------------------------------

    def create_repo(self, body: bytes):
        self._require_token()
        request = json.loads(body)
        repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        repo = self.hub.repos[repo_id] = Repo(private=request.get("visibility") == "private" or bool(request.get("private")))
        tree = {".gitattributes": self.hub.store(GITATTRIBUTES, lfs=False)}
        repo.refs["main"] = self.hub.commit(repo, None, tree, "initial commit")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self, body: bytes):
        content = json.loads(body)["content"]
        if not content.startswith("---\n") or "\n---\n" not in content[3:]:
            return 400, {"error": "README.md has no YAML metadata block"}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def create_branch(self, body: bytes, repo: str, branch: str):
        self._require_token()
        found = self._repo(repo)
        if branch in found.refs:
            raise HttpError(409, f"Branch {branch} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        found.refs[branch] = self._head(found, start)
        return 200, {}, {}

    def preupload(self, body: bytes, repo: str, rev: str):
        self._require_token()
        found = self._repo(repo)
        tree = found.commits[self._head(found, rev)]
        files = []
        for file in json.loads(body)["files"]:
            lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] > 10 * 2**20
            existing = tree.get(file["path"])
            oid = (existing.sha256 if existing.lfs else existing.git_oid) if existing else None
            mode = "lfs" if lfs else "regular"
            files.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": found.refs.get(rev)}, {}

    def lfs_batch(self, body: bytes, repo: str):
        self._require_token()
        self._repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.hub.objects / obj["oid"]).is_file():
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def lfs_put(self, body: bytes, oid: str):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, "uploaded content does not match its sha256")
        self.hub.store(body, lfs=True)
        return 200, {}, {}

    def commit(self, body: bytes, repo: str, rev: str):
        self._require_token()
        if self.hub.fail_commits:
            self.hub.fail_commits -= 1
            raise HttpError(500, "Internal Error - the server failed while committing")
        found = self._repo(repo)
        parent = self._head(found, rev)
        tree = dict(found.commits[parent])
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                tree[value["path"]] = self.hub.store(base64.b64decode(value["content"]), lfs=False)
            elif item["key"] == "lfsFile":
                stored = self.hub.objects / value["oid"]
                if not stored.is_file():
                    raise HttpError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                tree[value["path"]] = Entry(value["oid"], stored.stat().st_size, _git_oid(stored.read_bytes()), True)
            elif item["key"] == "deletedFile":
                tree.pop(value["path"], None)
        oid = self.hub.commit(found, parent, tree, message)
        pull_url = None
        if self.query.get("create_pr") == "1":
            found.pulls += 1
            found.refs[f"refs/pr/{found.pulls}"] = oid
            pull_url = f"{self.hub.url}/{repo}/discussions/{found.pulls}"
        else:
            found.refs[rev] = oid
        return 200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pull_url}, {}

    # ---- reading ---------------------------------------------------------------------------------

    def repo_info(self, body: bytes, repo: str, rev: str = "main"):
        found = self._repo(repo)
        sha = self._head(found, rev)
        siblings = [{"rfilename": path} for path in found.commits[sha]]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": found.private, "siblings": siblings}, {}

    def tree(self, body: bytes, repo: str, rev: str, path: str = ""):
        found = self._repo(repo)
        entries = []
        for name, e in sorted(found.commits[self._head(found, rev)].items()):
            if name.startswith(path):
                entry = {"type": "file", "oid": e.git_oid, "size": e.size, "path": name}
                if e.lfs:
                    entry["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
                entries.append(entry)
        return 200, entries, {}

    def resolve(self, body: bytes, repo: str, rev: str, path: str):
        found = self._repo(repo)
        sha = self._head(found, rev)
        entry = found.commits[sha].get(path)
        if entry is None:
            raise HttpError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.git_oid}"'}
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        return 200, (self.hub.objects / entry.sha256).read_bytes(), headers
