"""What ``serve`` checks before it announces ``serve: http://HOST:PORT/`` (#29 item 14): a server that prints its
address and then dies (a 63-line traceback for ``--device cuda`` on a machine without a GPU, exit 3 for a port in use)
has told the user something false. Each refusal is one line naming the option (:class:`~healthai.errors.ConfigError`).
"""

from __future__ import annotations

import errno
import socket

from healthai.errors import ConfigError


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where torch sees no CUDA GPU."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu --dtype float32 "
                          "(or --device auto, which picks a GPU when there is one)")  # fmt: skip


def check_port(host: str, port: int) -> None:
    """Refuse a ``host:port`` that cannot be listened on: a port another process holds, or a host that is not an
    address of this machine. Bound the way uvicorn binds (``SO_REUSEADDR``, so a connection of an earlier run still in
    TIME_WAIT does not count as in use) and released at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {host} (another server, or an earlier serve "
                                  "still running); stop it or choose another --port") from None  # fmt: skip
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
