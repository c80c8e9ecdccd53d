"""MECA container tasks: the command lines and the HTTP exchange, without an
engine (none runs on this project's machines); a real run where one does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from daemon.containers import ContainerError, host_port, post_when_ready, resource_limits, run_argv
from hub_server import protocol as p


def test_run_argv_publishes_on_loopback_only_and_limits_the_container():
    call = p.ContainerCall(engine="podman", image="meca/knn:1", data="{}")
    argv = run_argv(call, "hwf-x", **resource_limits({"cores": 2, "ram": "256MB"}))
    assert argv[:4] == ["podman", "run", "-d", "--name"]
    assert "127.0.0.1::8080" in argv and "0.0.0.0" not in " ".join(argv)
    assert argv[argv.index("--cpus") + 1] == "2" and argv[argv.index("--memory") + 1] == "256m"
    assert "--cap-drop" in argv and "no-new-privileges" in argv
    assert argv[-2:] == ["--", "meca/knn:1"]  # an image named like an option stays an image
    assert "--gpus" not in argv and "--cpus" not in run_argv(call, "n", cpus=None, memory_mb=None)


def test_host_port():
    assert host_port("127.0.0.1:49153\n") == 49153
    assert host_port("127.0.0.1:49153\n[::1]:49154\n") == 49153
    with pytest.raises(ContainerError, match="published port"):
        host_port("no such port")


SERVER = textwrap.dedent("""
    import http.server, json, sys, time
    time.sleep(float(sys.argv[2]))  # starts late, as a container does
    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            data = json.loads(body)
            out = json.dumps({"echo": data["input"]}).encode()
            self.send_response(200 if data["input"] != "fail" else 500)
            self.end_headers()
            self.wfile.write(out)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_post_waits_for_the_server_then_returns_its_reply(tmp_path):
    port = _free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), "1.0"])
    try:
        reply = post_when_ready(port, '{"input": "hi"}', "/", time.monotonic() + 30)
        assert reply == '{"echo": "hi"}'
        with pytest.raises(ContainerError, match="HTTP 500"):
            post_when_ready(port, '{"input": "fail"}', "/", time.monotonic() + 30)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(ContainerError, match="did not answer"):
        post_when_ready(port, "{}", "/", time.monotonic() + 0.5)


def _engine() -> str | None:
    for engine in ("docker", "podman"):
        exe = shutil.which(engine)
        if exe and subprocess.run([exe, "version"], capture_output=True).returncode == 0:
            return engine
    return None


@pytest.mark.e2e
@pytest.mark.skipif(_engine() is None, reason="no container engine (docker/podman) runs on this machine")
def test_a_meca_container_task_on_a_real_engine(tmp_path):
    import asyncio

    from hwf_jupyter import LocalCluster
    from hwf_jupyter import offload as meca

    engine = _engine()
    image = "meca-echo-test"
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import http.server, json
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200); self.end_headers(); self.wfile.write(data["input"].upper().encode())
        print("meca-init-done", flush=True)
        http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
    """))
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\nCOPY app.py /app.py\nEXPOSE 8080\n"
                                         'CMD ["python", "/app.py"]\n')
    subprocess.run([engine, "build", "-t", image, str(tmp_path)], check=True)
    got = []
    with LocalCluster(daemons=1, daemon_args=["--containers"]) as c:
        async def main():
            await meca.initiate_connection(hub=c.address, token=c.token)
            await meca.offload_task("c1", image, '{"input": "hello"}', got.append, runtime=engine)
            await meca.join(join_timeout=300)
            await meca.disconnect()
        asyncio.run(main())
    assert got == ["HELLO"]
