"""Two real HTTP servers for the tests of the tracking-server probes (tests/test_doctor.py), answering 200
on every path with the client's port (one per connection) as the body, sent after the headers as a WSGI
app's is behind MLflow's server:

- ``python -m uvicorn http_app:app``: sockets with TCP_NODELAY, answers at once on a kept-alive connection;
- ``python http_app.py PORT``: Python's own threaded HTTP/1.1 server, whose sockets keep Nagle's algorithm
  (socketserver's default), as uvicorn's did with ``--workers`` above 1 before 0.55 (uvicorn issue
  #3149): on a kept-alive connection the body waits for the client's delayed ACK, ~40 ms on Linux.
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(scope["client"][1]).encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class _Late(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections

    def do_GET(self):
        body = str(self.client_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # one segment; the body below is a second one, held until the first is ACKed
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Late).serve_forever()
