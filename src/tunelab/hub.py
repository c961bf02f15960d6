"""The Hugging Face Hub, tried at most once per process.

Without a network the hub client retries each request for about a minute, printing a warning per
retry, and then fails anyway (or reads its cache). tunelab asks once, quickly, whether the Hub's
endpoint answers; if not, a Hub id that is in the local cache is read from it in offline mode, and
one that is not fails at once, saying what to use instead.
"""

from __future__ import annotations

import functools
import logging
import socket
from urllib.parse import urlparse

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@functools.cache
def reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint (HF_ENDPOINT) opens; False in offline mode."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """The hub client, transformers and datasets read only their caches from here on."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read through huggingface_hub.constants.is_offline_mode() by transformers
    try:
        import datasets.config  # keeps its own copy, taken at import
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def model_or_cache(name: str, what: str = "model.name") -> None:
    """Let a Hub model id load: the Hub answers, or its config is cached (then read offline); else an
    error naming `what` (the setting that led to it) and the local choices."""
    if reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise TunelabError(
            f"{what}: {name} is a Hugging Face Hub id, but {constants.ENDPOINT} cannot be reached and it is "
            "not in the local cache; use model.name=embedded (the packaged SmolLM2-135M-Instruct), a .gguf file "
            "or a local model folder")
    log.info("%s cannot be reached: %s is read from the local cache", constants.ENDPOINT, name)
    go_offline()


def dataset_or_cache() -> str:
    """Before a Hub dataset loads: offline mode if the Hub does not answer (datasets then reads its cache);
    returns the sentence to add to a failure ('' when the Hub answers)."""
    if reachable():
        return ""
    from huggingface_hub import constants

    go_offline()
    return f"; {constants.ENDPOINT} cannot be reached, and only a cached copy could be used"
