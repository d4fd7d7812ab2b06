"""Is the model hub reachable? One quick check shared by every loader, so that offline runs
fail in seconds with a message saying to pass a local path, instead of retrying for minutes."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
