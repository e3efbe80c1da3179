import socket


def free_port() -> int:
    """A free TCP port on the loopback (for single-process groups and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
