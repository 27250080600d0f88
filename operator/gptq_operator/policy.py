"""What a spec may ask of the operator on its user's behalf: images and Secrets.

The operator's account can create pods that run any image with any Secret of the
namespace; a user who may only create QuantizationJobs and QuantizedModels must not
obtain through them what RBAC denies them directly (a confused deputy). So a spec may name
only images whose repository the operator's settings allow (``GPTQ_ALLOWED_IMAGES``:
by default the repositories of the default images) and only Secrets whose name the
settings allow (``GPTQ_ALLOWED_SECRETS``: shell patterns, by default ``hf-token`` and
``gptq-*``). Names are what can be checked: the operator may not read Secrets, so it
cannot look at their labels. Credentials in text the operator writes are scrubbed.
"""

from __future__ import annotations

import fnmatch
import re

from gptq_operator.settings import OperatorSettings, repository

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_TOKENS = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{20,})\b"
)


def image_allowed(image: str, settings: OperatorSettings) -> bool:
    allowed = settings.allowed_image_repositories()
    return "*" in allowed or any(
        repository(image) == a or (a.endswith("/") and image.startswith(a)) for a in allowed
    )


def refuse_images(images: dict[str, str | None], settings: OperatorSettings) -> str | None:
    """Why the images a spec names may not run, or None when they may."""
    bad = {k: v for k, v in images.items() if v and not image_allowed(v, settings)}
    if not bad:
        return None
    named = ", ".join(f"spec.image.{k} {v}" for k, v in sorted(bad.items()))
    return (
        f"{named}: the operator's settings do not allow this image repository (allowed: "
        f"{', '.join(settings.allowed_image_repositories())}); use an allowed image, or "
        f"ask the operator's administrator to add it to GPTQ_ALLOWED_IMAGES (Helm value "
        f"policy.allowedImages)"
    )


def refuse_secrets(refs: dict[str, str | None], settings: OperatorSettings) -> str | None:
    """Why the Secrets a spec names may not be given to its pods, or None."""
    patterns = settings.allowed_secrets
    bad = {
        field: name
        for field, name in refs.items()
        if name and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }
    if not bad:
        return None
    named = ", ".join(f"{field} {name}" for field, name in sorted(bad.items()))
    return (
        f"{named}: the operator's settings do not allow giving this Secret to its pods "
        f"(allowed names: {', '.join(patterns)}); rename the Secret to match, or ask the "
        f"operator's administrator to add it to GPTQ_ALLOWED_SECRETS (Helm value "
        f"policy.allowedSecrets)"
    )


def scrub(text: str) -> str:
    """``text`` without credentials: user-info in URIs and well-known token shapes."""
    return _TOKENS.sub("[redacted]", _USERINFO.sub(r"\g<scheme>[redacted]@", text))
