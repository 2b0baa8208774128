"""Helpers for running `gaikan serve` as a real process: the tests that kill it or run PostgreSQL
replicas, and the service benchmarks (bench/service_load.py, bench/scale_service.py import them)."""

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 90.0, output=None) -> float:
    """Wait until the server at ``url`` answers /healthz; the seconds it took. Fails with the tail of
    its output (``output()`` -> text; default: its stderr) if it exits first or ``timeout`` passes."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            text = output() if output is not None else proc.stderr.read().decode()
            raise AssertionError(f"gaikan serve exited with {proc.returncode}: {text[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return time.time() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gaikan serve at {url} did not come up in {timeout:.0f} s")


def stop_servers(procs) -> None:
    """SIGTERM every server, then wait for each (SIGKILL after 30 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
