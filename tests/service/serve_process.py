"""Helpers for tests that run `gaikan serve` as a real process (kill -9, PostgreSQL replicas)."""

import socket
import time

import httpx


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 90.0) -> None:
    """Wait until the server at ``url`` answers /healthz; fail with its stderr if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gaikan serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gaikan serve at {url} did not come up in {timeout:.0f} s")
