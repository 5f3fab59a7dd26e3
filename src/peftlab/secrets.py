"""Keep tokens and API keys out of everything a run writes: config, summary, metrics, logs, reports.

`redact` is applied by the run-folder writers (runs.py) and the console, so a secret that slips into
a recipe field, an error message or a traceback is replaced before it reaches a file or a terminal.
Two sources of secrets: the values of environment variables named like credentials (HF_TOKEN,
WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...), and strings shaped like well-known token formats.
"""

from __future__ import annotations

import os
import re
from typing import Any

from peftlab.errors import PeftlabError

REDACTED = "<redacted>"

# A name segment that marks a credential: HF_TOKEN, WANDB_API_KEY, DB_PASSWORD, MY_SECRET_X.
# Segment-anchored so TOKENIZERS_PARALLELISM or KEYTIMEOUT are not taken for secrets.
SECRET_NAME = re.compile(r"(?:^|_)(?:[A-Z]*TOKEN|[A-Z]*KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)S?(?:_|$)", re.IGNORECASE)
# Shorter values ("1", "false") would turn ordinary text into redaction marks.
MIN_SECRET_LENGTH = 8

TOKEN_PATTERNS = re.compile(
    "|".join((
        r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face
        r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI / Anthropic style
        r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}",  # GitHub
        r"\bgithub_pat_[A-Za-z0-9_]{20,}",
        r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
        r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
        r"(?<=://)[^/\s:@'\"]+:[^/\s@'\"]+(?=@)",  # user:password@ in URLs
    ))
)
# key=value, key: value, "key": "value" where the key names a credential (not e.g. max_new_tokens: 48).
KEY_VALUE = re.compile(
    r"(?i)(?<![A-Za-z0-9])((?:api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|password|passwd)[\"']?\s*[=:]\s*[\"']?"
    r"|bearer\s+)[^\s'\"\\,}&]{6,}"
)


def secret_env_values() -> dict[str, str]:
    """Values of credential-named environment variables, longest first (so overlaps redact fully)."""
    found = {
        name: value
        for name, value in os.environ.items()
        if SECRET_NAME.search(name) and len(value.strip()) >= MIN_SECRET_LENGTH
    }
    return dict(sorted(found.items(), key=lambda item: -len(item[1])))


def redact_secrets(text: str) -> str:
    """`text` with the values that are secrets by themselves (credential environment values, token shapes,
    passwords in URLs) replaced by a marker naming where they came from, never the value."""
    for name, value in secret_env_values().items():
        if value in text:
            text = text.replace(value, f"<redacted:{name}>")
    return TOKEN_PATTERNS.sub(REDACTED, text)


def redact(text: str) -> str:
    """Free text (logs, errors, metrics): `redact_secrets`, plus any value that follows a credential word
    (`password=...`, `Bearer ...`): in free text there is no telling what else that value could be."""
    return KEY_VALUE.sub(lambda match: match.group(1) + REDACTED, redact_secrets(text))


# Recipe fields that are prose, where a pasted secret is redacted; every other field is structure
# (templates, columns, paths, labels, names of things) and must be saved exactly, or the saved recipe
# would no longer train, resume or generate the same way.
FREE_TEXT_FIELDS = ("name", "eval.prompts", "tracking.project")


def redact_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict (Recipe.to_dict()) as a run folder may store it: secrets in prose fields redacted,
    structural fields kept byte for byte. Raises PeftlabError when a structural field holds a secret,
    since it can be neither written nor changed."""
    return _redact_tree(data, "")


def _redact_tree(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _redact_tree(v, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_tree(v, key) for v in value]
    if not isinstance(value, str) or redact_secrets(value) == value:
        return value
    if key in FREE_TEXT_FIELDS:
        return redact_secrets(value)
    raise PeftlabError(
        f"{key}: holds a secret ({redact_secrets(value)}), and a run folder stores the recipe exactly but never a "
        "secret; fix: pass credentials through the environment (HF_TOKEN, ~/.netrc), not the recipe"
    )
