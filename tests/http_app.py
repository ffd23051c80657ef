"""The smallest ASGI app: 200 on every path, the body (the client's port: one per connection) sent in two
parts as a WSGI app's is behind MLflow's server. ``python -m uvicorn http_app:app --workers N`` is a real
server for the tests of the tracking-server probes (tests/test_doctor.py)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(scope["client"][1]).encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
