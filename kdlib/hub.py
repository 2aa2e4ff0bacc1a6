"""Fail fast, and say why, when something needs the Hugging Face hub and cannot reach it.

Without this, `from_pretrained` on an unreachable hub hangs for close to a minute before a
generic error; workshops on poor networks and CI must get a clear message in seconds.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request


class HubUnavailableError(RuntimeError):
    """The hub is needed for this run and is not reachable (or is switched off)."""


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def require_hub(what: str, timeout: float = 3.0) -> None:
    """Raise `HubUnavailableError` within `timeout` seconds unless the hub answers.

    `what` names the model or data set that needs it, so the message can say what to do.
    """
    hint = (
        f"{what} must be fetched from the Hugging Face hub. Run on a machine with hub access "
        "(paper profile), or use the default profile, which needs only the offline models "
        "and the local data mirror (set KDLIB_DATA_DIR)."
    )
    if _offline_flag():
        raise HubUnavailableError(f"HF_HUB_OFFLINE is set, so nothing is downloaded. {hint}")
    from huggingface_hub import constants

    request = urllib.request.Request(f"{constants.ENDPOINT}/api/models?limit=1", method="HEAD")
    try:  # a TCP connect is not enough: some networks accept every connection and answer nothing
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # the hub answered (an HTTP error status is still an answer)
    except (urllib.error.URLError, OSError) as err:
        raise HubUnavailableError(
            f"the hub ({constants.ENDPOINT}) did not answer within {timeout:.0f} s ({err}). {hint}"
        ) from err
