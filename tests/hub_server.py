"""A tiny Hugging-Face-shaped file server on 127.0.0.1, shared by the tests that
download weights. It answers `/{repo}/resolve/{revision}/{file}` as the Hub and
its mirrors do for huggingface_hub: HEAD and GET with `X-Repo-Commit`, `ETag`
(the sha256 of the file, as for LFS files) and `Content-Length`, and byte
ranges for resumed downloads. No test touches the internet."""

import hashlib
import http.server
import re
import threading
import time


class Hub:
    """The server (port 0). `files` maps a resolve path to its bytes; `mode`
    is ok | truncate | slow; `requests` counts GETs (downloads)."""

    def __init__(self):
        self.files = {}  # path -> bytes
        self.mode = "ok"
        self.requests = 0
        self.heads = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _entry(self):
                body = hub.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return body

            def _headers(self, body, status=200, start=0):
                match = re.match(r"^/.+?/resolve/([^/]+)/", self.path)
                self.send_response(status)
                self.send_header("X-Repo-Commit", match.group(1) if match else "0" * 40)
                self.send_header("ETag", '"%s"' % hashlib.sha256(body).hexdigest())
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()

            def do_HEAD(self):
                hub.heads += 1
                body = self._entry()
                if body is not None:
                    self._headers(body)

            def do_GET(self):
                hub.requests += 1
                body = self._entry()
                if body is None:
                    return
                start = 0
                ranged = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if ranged and int(ranged.group(1)) < len(body):
                    start = int(ranged.group(1))
                self._headers(body, 206 if start else 200, start)
                payload = body[start:]
                try:
                    if hub.mode == "truncate":
                        self.wfile.write(payload[: len(payload) // 2])
                        self.close_connection = True
                    elif hub.mode == "slow":
                        for offset in range(0, len(payload), 1 << 20):
                            self.wfile.write(payload[offset : offset + (1 << 20)])
                            time.sleep(0.2)
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def serve_pretrained(monkeypatch, tmp_path, variant, body):
    """A Hub serving `body` as `variant`'s ImageNet file, with the environment
    (endpoint, fresh Keras and Hugging Face caches, online) and the pin (the
    body's sha256) pointing at it. Stop the returned server when done."""
    from keras_sequencer import registry

    source = registry.PRETRAINED[variant]
    server = Hub()
    server.files[f"/{source['repo_id']}/resolve/{source['revision']}/{source['filename']}"] = body
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(registry.PRETRAINED, variant, dict(source, sha256=hashlib.sha256(body).hexdigest()))
    return server
