"""A small stand-in for the Hugging Face Hub on 127.0.0.1: just the part of its HTTP API that `peftkit push` and
pulling by name use, so the tests drive the real huggingface_hub client (pointed at it with HF_ENDPOINT) rather
than mocking its functions.

    POST /api/repos/create                          create a model repo (409 if it exists)
    POST /api/validate-yaml                         the model card's metadata: YAML, a mapping (else 400)
    POST /api/models/{repo}/branch/{branch}         create a branch from main (409 if it exists)
    POST /api/models/{repo}/preupload/{rev}         upload mode per file: always "regular" (no LFS/Xet)
    POST /api/models/{repo}/commit/{rev}            ndjson: header line, then base64 files
    GET  /api/models/{repo}/revision/{rev}          model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}              file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}           file download

Writes need `Authorization: Bearer <one of the server's tokens>` (else 401); reads are public.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}  # sha -> the whole tree at that commit
        self.branches: dict[str, str | None] = {"main": None}  # branch -> head sha (None: no commit yet)
        self.messages: list[str] = []

    def files(self, rev: str) -> dict[str, bytes] | None:
        sha = self.branches.get(rev, rev)
        if sha is None:
            return {}
        return self.commits.get(sha)

    def sha(self, rev: str) -> str | None:
        return self.branches.get(rev, rev if rev in self.commits else None)


class FakeHub:
    """Start with `with FakeHub(tokens={"secret"}) as hub:`; `hub.url` is the endpoint, `hub.repos` what it holds."""

    def __init__(self, tokens=("hf_test_token",)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path): what the client asked for
        self.cards: list[dict] = []  # model card metadata the client had validated
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # --- plumbing ---------------------------------------------------------------------------------

        def _send(self, status: int, body=b"", headers=None, head=False):
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if isinstance(body, (dict, list)):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            self._send(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> bool:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token in hub.tokens:
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return False

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        # --- routes -----------------------------------------------------------------------------------

        def do_POST(self):
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("POST", path))
            body = self._body()
            if not self._authorised():
                return
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body)["content"])
            if path == "/api/repos/create":
                spec = json.loads(body)
                repo_id = f"{spec['organization']}/{spec['name']}"
                if repo_id in hub.repos:
                    return self._error(409, "You already created this model repo")
                hub.repos[repo_id] = Repo(private=spec.get("visibility") == "private")
                return self._send(200, {"url": f"{hub.url}/{repo_id}"})
            found = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
            if not found:
                return self._error(404, f"no route {path}")
            repo_id, action, rev = found.groups()
            repo = self._repo(repo_id)
            if repo is None:
                return
            if action == "branch":
                if rev in repo.branches:
                    return self._error(409, "Reference already exists")
                repo.branches[rev] = repo.branches["main"]
                return self._send(200, {})
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    },
                )
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            tree = dict(repo.files(rev) or {})
            for line in lines:
                if line["key"] == "header":
                    repo.messages.append(line["value"]["summary"])
                elif line["key"] == "file":
                    tree[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                else:
                    return self._error(400, f"this test hub does not support {line['key']}")
            sha = hashlib.sha1(
                json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in tree.items())).encode()
                + str(len(repo.commits)).encode()
            ).hexdigest()
            repo.commits[sha], repo.branches[rev] = tree, sha
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

        def _validate_yaml(self, content: str):
            import yaml

            found = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(found.group(1)) if found else None
            except yaml.YAMLError as err:
                meta = err
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": f"metadata is not a YAML mapping: {meta!r}"}]})
            hub.cards.append(meta)
            return self._send(200, {"warnings": []})

        def do_GET(self, head=False):
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("HEAD" if head else "GET", path))
            found = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
            if found:
                repo_id, action, rev = found.groups()
                repo = self._repo(repo_id)
                if repo is None:
                    return
                files, sha = repo.files(rev), repo.sha(rev)
                if files is None or sha is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                if action == "revision":
                    return self._send(
                        200,
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": sha,
                            "private": repo.private,
                            "siblings": [{"rfilename": name} for name in sorted(files)],
                        },
                    )
                return self._send(
                    200,
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(files.items())
                    ],
                )
            found = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not found:
                return self._error(404, f"no route {path}")
            repo_id, rev, name = found.groups()
            repo = self._repo(repo_id)
            if repo is None:
                return
            files = repo.files(rev) or {}
            if name not in files:
                return self._error(404, "Entry not found", "EntryNotFound")
            data = files[name]
            headers = {"X-Repo-Commit": repo.sha(rev), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            self._send(200, data, headers, head=head)

        def do_HEAD(self):
            self.do_GET(head=True)

    return Handler
