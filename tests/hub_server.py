"""A local stand-in for the Hugging Face Hub, for tests: serves folders as model repos over HTTP.

huggingface_hub's real client (``snapshot_download``, ``hf_hub_download``) talks to it through
``HF_ENDPOINT``; nothing leaves 127.0.0.1. It serves what huggingface_hub 2.4 requests when downloading:

- ``GET /api/models/{org}/{name}[/revision/{revision}]``: the repo info (``id``, ``sha``, ``siblings``);
- ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]?recursive=...``: the file listing;
- ``HEAD`` / ``GET /{org}/{name}/resolve/{revision}/{path}``: a file, with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length``.

Errors carry the ``X-Error-Code`` header huggingface_hub turns into its exceptions: ``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``.

Every request is recorded (method and decoded path), so tests can assert which files were fetched.

Usage::

    def test_something(monkeypatch, tmp_path):
        with serve_hub(monkeypatch, tmp_path / "hf") as hub:
            sha = hub.add_revision("org/model", folder)
            ...  # snapshot_download("org/model") now downloads from the local server
            assert "org/model/resolve/{sha}/config.json" ...  # see hub.requested_files()
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from typing_extensions import Self

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the server received: ``method`` (``"GET"``/``"HEAD"``), decoded ``path``, raw ``query``,
    and ``headers`` (names lowercased)."""

    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)


@dataclasses.dataclass
class _Revision:
    sha: str
    files: dict[str, bytes]  # repo path ("vae/config.json") → content


@dataclasses.dataclass
class _Repo:
    revisions: dict[str, _Revision] = dataclasses.field(default_factory=dict)  # sha → revision
    refs: dict[str, str] = dataclasses.field(default_factory=dict)  # branch or tag → sha

    def resolve(self, revision: str) -> _Revision | None:
        sha = self.refs.get(revision, revision)
        return self.revisions.get(sha)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file (what the Hub reports as a file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(data: bytes) -> str:
    """The ETag served for a file: its sha256 (as the Hub does for LFS files). Equal content, equal ETag."""
    return hashlib.sha256(data).hexdigest()


def read_folder(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) as ``{posix relative path: bytes}``."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class HubServer:
    """A threaded HTTP server on 127.0.0.1 (free port) serving repos registered with :meth:`add_revision`.

    Thread-safe: repos may be changed and the request log read while the server runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._requests: list[Request] = []
        self._hooks: list[Callable[[Request], None]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.cache_dir: Path | None = None  # set by serve_hub: the Hub cache folder huggingface_hub uses

    # -----------------------------------------------------------------------------------------------------
    # Repos

    def add_revision(
        self,
        repo_id: str,
        folder: str | Path | dict[str, bytes],
        *,
        sha: str | None = None,
        branches: Iterable[str] = ("main",),
    ) -> str:
        """Add a commit to ``repo_id`` (created if new) holding a snapshot of ``folder``; returns its sha.

        Args:
            repo_id: ``"org/name"``.
            folder: A folder to copy now (later changes to it are not served), or ``{path: bytes}``.
            sha: The commit sha (40 hex digits); default: derived from the content and the repo's history.
            branches: Branch or tag names to point at this commit (moved if they exist).
        """
        files = dict(folder) if isinstance(folder, dict) else read_folder(folder)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            if sha is None:
                digest = hashlib.sha1(f"{repo_id}\0{len(repo.revisions)}\0".encode())
                for path, data in sorted(files.items()):
                    digest.update(path.encode() + b"\0" + etag_of(data).encode())
                sha = digest.hexdigest()
            if len(sha) != 40 or any(c not in "0123456789abcdef" for c in sha):
                raise ValueError(f"sha must be 40 lowercase hex digits, got {sha!r}")
            repo.revisions[sha] = _Revision(sha, files)
            for branch in branches:
                repo.refs[branch] = sha
        return sha

    def set_ref(self, repo_id: str, ref: str, sha: str) -> None:
        """Point the branch or tag ``ref`` of ``repo_id`` at the commit ``sha``."""
        with self._lock:
            repo = self._repos[repo_id]
            if sha not in repo.revisions:
                raise KeyError(f"{repo_id} has no commit {sha}")
            repo.refs[ref] = sha

    def add_hook(self, hook: Callable[[Request], None]) -> None:
        """Call ``hook(request)`` on the server thread for each request, before it is answered."""
        with self._lock:
            self._hooks.append(hook)

    # -----------------------------------------------------------------------------------------------------
    # Request log

    @property
    def requests(self) -> list[Request]:
        """A copy of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def file_requests(
        self, repo_id: str | None = None, method: str | None = None
    ) -> list[tuple[str, str, str]]:
        """``(repo_id, revision, path)`` of each ``/resolve/`` request (``method``: only GET or only HEAD)."""
        found = []
        for request in self.requests:
            if method is not None and request.method != method:
                continue
            parts = request.path.lstrip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = f"{parts[0]}/{parts[1]}"
                if repo_id is None or repo == repo_id:
                    found.append((repo, parts[3], "/".join(parts[4:])))
        return found

    def requested_files(self, repo_id: str | None = None) -> set[str]:
        """Repo paths of the files asked for (HEAD or GET) through ``/resolve/``."""
        return {path for _, _, path in self.file_requests(repo_id)}

    def downloaded_files(self, repo_id: str | None = None) -> set[str]:
        """Repo paths of the files whose content was sent (GET ``/resolve/``)."""
        return {path for _, _, path in self.file_requests(repo_id, method="GET")}

    # -----------------------------------------------------------------------------------------------------
    # Running

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("the server is already running")
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (idempotent): later requests fail to connect."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------------------
    # Answers (called from the handler threads)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)
            hooks = list(self._hooks)
        for hook in hooks:
            hook(request)

    def _lookup(self, repo_id: str, revision: str) -> tuple[_Repo | None, _Revision | None]:
        with self._lock:
            repo = self._repos.get(repo_id)
            return repo, (repo.resolve(revision) if repo is not None else None)


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        hub = server

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no pooled connection outlives ``stop()``.
    protocol_version = "HTTP/1.0"
    server_version = "LocalHub/1.0"
    hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    # -----------------------------------------------------------------------------------------------------

    def _handle(self, send_body: bool) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Request(self.command, "/" + "/".join(segments), split.query, headers)
        try:
            self.hub._record(request)
            self._route(segments, parse_qs(split.query), send_body)
        except Exception as error:  # noqa: BLE001 - any bug in the server or a hook: a 500, not a hung client
            self._send_json(500, {"error": f"{type(error).__name__}: {error}"}, send_body)

    def _route(self, segments: list[str], query: dict[str, list[str]], send_body: bool) -> None:
        if len(segments) >= 4 and segments[:2] == ["api", "models"]:
            repo_id = f"{segments[2]}/{segments[3]}"
            rest = segments[4:]
            if not rest:
                return self._model_info(repo_id, "main", send_body)
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], send_body)
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[-1].lower() in {"1", "true"}
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive, send_body)
        elif len(segments) >= 5 and segments[2] == "resolve":
            repo_id, revision, path = f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:])
            return self._resolve(repo_id, revision, path, send_body)
        self._send_json(404, {"error": "Not Found"}, send_body, error_code=None)

    def _find(self, repo_id: str, revision: str, send_body: bool) -> _Revision | None:
        repo, found = self.hub._lookup(repo_id, revision)
        if repo is None:
            self._send_json(
                404,
                {"error": "Repository not found"},
                send_body,
                error_code="RepoNotFound",
                error_message="Repository not found",
            )
            return None
        if found is None:
            self._send_json(
                404,
                {"error": f"Invalid rev id: {revision}"},
                send_body,
                error_code="RevisionNotFound",
                error_message=f"Invalid rev id: {revision}",
            )
            return None
        return found

    def _model_info(self, repo_id: str, revision: str, send_body: bool) -> None:
        found = self._find(repo_id, revision, send_body)
        if found is None:
            return
        self._send_json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": found.sha,
                "lastModified": LAST_MODIFIED,
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": path} for path in sorted(found.files)],
            },
            send_body,
        )

    def _tree(self, repo_id: str, revision: str, path: str, recursive: bool, send_body: bool) -> None:
        found = self._find(repo_id, revision, send_body)
        if found is None:
            return
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: list[dict] = []
        folders: set[str] = set()
        for name, data in sorted(found.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:  # a recursive listing names every folder too, as the Hub does
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name})
        if prefix and not entries and not folders:
            self._send_json(
                404,
                {"error": f"{path} does not exist"},
                send_body,
                error_code="EntryNotFound",
                commit=found.sha,
            )
            return
        entries += [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        self._send_json(200, entries, send_body)

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        found = self._find(repo_id, revision, send_body)
        if found is None:
            return
        data = found.files.get(path)
        if data is None:
            self._send_json(
                404,
                {"error": "Entry not found"},
                send_body,
                error_code="EntryNotFound",
                error_message="Entry not found",
                commit=found.sha,
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{etag_of(data)}"')
        self.send_header("X-Repo-Commit", found.sha)
        self.send_header("Accept-Ranges", "none")
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _send_json(
        self,
        status: int,
        payload: object,
        send_body: bool,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        commit: str | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if error_code is not None:
            self.send_header("X-Error-Code", error_code)
        if error_message is not None:
            self.send_header("X-Error-Message", error_message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


# ---------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at the server


def _close_hub_session() -> None:
    """Drop huggingface_hub's shared HTTP client: it reads proxy settings once, when created."""
    from huggingface_hub.utils import _http

    _http.close_session()


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: str | Path) -> Path:
    """Point huggingface_hub at ``endpoint`` with ``cache_dir`` as its cache, online, bypassing proxies.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when imported,
    so its ``constants`` are patched as well as the environment. Everything is undone by ``monkeypatch``.

    Returns:
        The Hub cache folder (``cache_dir/hub``).
    """
    from huggingface_hub import constants

    home = Path(cache_dir)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint.rstrip("/")

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    url_template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # Never send a token found on this machine to the test server.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import _cache_manager

        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))

    _close_hub_session()
    return hub_cache


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Set ``HF_HUB_OFFLINE`` in the environment and in huggingface_hub's constants (read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@contextlib.contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, cache_dir: str | Path) -> Iterator[HubServer]:
    """Start a :class:`HubServer`, point huggingface_hub at it (see :func:`use_hub`), stop it at the end.

    The server's Hub cache folder is ``server.cache_dir``. The patches stay until ``monkeypatch`` undoes them,
    so a test can stop the server and keep loading from the cache.
    """
    server = HubServer().start()
    try:
        server.cache_dir = use_hub(monkeypatch, server.url, cache_dir)
        yield server
    finally:
        server.stop()
        _close_hub_session()


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A running :class:`HubServer` that huggingface_hub uses, with a fresh cache under ``tmp_path``."""
    with serve_hub(monkeypatch, tmp_path / "hf-home") as server:
        yield server
