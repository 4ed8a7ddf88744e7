"""The atlas server over real HTTP on 127.0.0.1: Host check, no listings, no way out of the folder, headers."""

from __future__ import annotations

import http.client
import os

import pytest

from convscope.serve import start_server


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "atlas"
    (root / "static").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>atlas</title>")
    (root / "static" / "atlas.js").write_text("// js")
    (root / "empty").mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("private photo paths")
    os.symlink(secret, root / "leak.txt")
    os.symlink(tmp_path, root / "outside")
    os.symlink(root / "index.html", root / "alias.html")  # a link that stays inside is fine
    server = start_server(root, port=0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def get(port: int, path: str, host: str | None = "default", method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host == "default":
            host = f"127.0.0.1:{port}"
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_serves_files_with_security_headers(site):
    for host in (f"127.0.0.1:{site}", "127.0.0.1", f"localhost:{site}", "LOCALHOST"):
        status, headers, body = get(site, "/index.html", host)
        assert status == 200 and b"atlas" in body
    status, headers, body = get(site, "/static/atlas.js")
    assert status == 200 and body == b"// js"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cross-origin-resource-policy"] == "same-origin"
    assert headers["x-frame-options"] == "DENY"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert get(site, "/")[0] == 200  # index.html of the folder


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example", "localhost:1",
                                  "127.0.0.1:{port}@evil.example", "", None])
def test_other_host_headers_get_403_and_no_content(site, host):
    host = host.format(port=site) if host else host
    for method in ("GET", "HEAD"):
        status, headers, body = get(site, "/index.html", host, method)
        assert status == 403 and body == b"" and headers["content-length"] == "0"


def test_no_directory_listing(site):
    for path in ("/empty/", "/static/"):
        status, _, body = get(site, path)
        assert status == 404 and b"atlas.js" not in body


def test_symlinks_out_of_the_folder_are_refused(site):
    assert get(site, "/alias.html")[0] == 200
    for path in ("/leak.txt", "/outside/secret.txt", "/outside/", "/../secret.txt", "/%2e%2e/secret.txt"):
        status, _, body = get(site, path)
        assert status == 404 and b"private" not in body
