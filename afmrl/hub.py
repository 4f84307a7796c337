"""Hub ids at the front door: say at once when a model or catalog id cannot be fetched, and what to do.

A hub id that is not cached needs the Hugging Face hub. Without network, transformers and datasets
retry for tens of seconds per file and then fail with a message about whichever file they tried
last (a processor, a README). Recipes ask here first, with one request and no retries::

    reason = hub_unreachable(repo_id, "model")   # None when the hub answers
    if reason:
        raise FileNotFoundError(f"{repo_id} is not cached and the hub {reason}: {download_hint(repo_id, 'model')}")
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["HubRepoNotFound", "download_hint", "hub_offline", "hub_unreachable"]


class HubRepoNotFound(FileNotFoundError):
    """The hub answered, and it has no such repository (or it is private or gated)."""


def hub_unreachable(repo_id: str, repo_type: str = "model") -> str | None:
    """None when the hub answers for ``repo_id``; else why it cannot be used ("is switched off
    (HF_HUB_OFFLINE=1)" or "(https://huggingface.co) cannot be reached (ConnectError: ...)"). Raises
    ``HubRepoNotFound`` when the hub answers 401/403/404."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers

    if constants.HF_HUB_OFFLINE:
        return "is switched off (HF_HUB_OFFLINE=1)"
    kind = "datasets" if repo_type == "dataset" else "models"
    try:  # one request, no retries
        response = get_session().head(
            f"{constants.ENDPOINT}/api/{kind}/{repo_id}", headers=build_hf_headers(), timeout=10, follow_redirects=True
        )
    except Exception as err:  # DNS failure, refused connection, timeout, proxy error
        return f"({constants.ENDPOINT}) cannot be reached ({type(err).__name__}: {err})"
    if response.status_code in (401, 403, 404):
        raise HubRepoNotFound(
            f"the hub answers {response.status_code} for the {repo_type} {repo_id!r}: check the id, "
            "or log in (`hf auth login`) if it is private or gated"
        )
    return None


def download_hint(repo_id: str, repo_type: str = "model") -> str:
    """What to do about a hub id that cannot be fetched here."""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return (
        f"download it where there is network (`hf download {repo_id}{flag}`) and point HF_HOME at that cache, "
        "or pass a local directory"
    )


@contextmanager
def hub_offline():
    """Within the block, huggingface_hub and datasets use their caches only (no request, no retry)."""
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
