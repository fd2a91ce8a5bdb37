"""A tiny Hugging-Face-shaped file server on 127.0.0.1, shared by the tests that
download weights (tests/test_weights.py, tests/test_readme.py). No test touches
the internet."""

import http.server
import threading
import time


class Hub:
    """A tiny Hugging-Face-shaped file server on 127.0.0.1 (port 0)."""

    def __init__(self):
        self.files = {}  # path -> bytes
        self.mode = "ok"  # ok | truncate | slow
        self.requests = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests += 1
                body = hub.files.get(self.path)
                if body is None:
                    self.send_error(404, "Entry not found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if hub.mode == "truncate":
                        self.wfile.write(body[: len(body) // 2])
                    elif hub.mode == "slow":
                        for start in range(0, len(body), 1 << 20):
                            self.wfile.write(body[start : start + (1 << 20)])
                            time.sleep(0.2)
                    else:
                        self.wfile.write(body)
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
