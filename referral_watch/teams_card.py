"""Teams cards with buttons (SPEC 17): Accept, Decline, Take it and Open as Action.OpenUrl.

Apprise's Workflows plugin (``workflows://``, or the workflow's https URL pasted as is) posts an
Adaptive Card. It takes the card from a template file (``template=PATH``) whose ``{{token}}``
placeholders it fills, JSON-escaped, with its own values (``app_title``, ``app_body``) and with
the URL's ``:key=value`` arguments. What Apprise lacks is a card whose number of buttons
varies: so the template for N buttons is written here, once per process, into a private
temporary folder, and each message passes its labels and URLs as ``:labelN``/``:urlN``.

Size: Teams refuses a card message over about 28 KB ("Message size limit", Microsoft Teams
connector: https://learn.microsoft.com/en-us/connectors/teams/). The title and body stay within
Apprise's 1,000 characters (render.TEAMS_MAX) and each button URL within
render.BUTTON_URL_MAX, so even fully escaped text keeps the card far under the limit.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

__all__ = ["card_template", "with_buttons"]

CARD_VERSION = "1.4"  # what Apprise's own card says; Teams renders 1.4 on every client
_lock = threading.Lock()
_folder: Path | None = None


def card(count: int) -> dict[str, object]:
    """The card for ``count`` buttons, with Apprise's placeholders in its strings."""
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": CARD_VERSION,
                    "body": [
                        {
                            "type": "TextBlock",
                            "text": "{{app_title}}",
                            "style": "heading",
                            "weight": "Bolder",
                            "size": "Large",
                            "wrap": True,
                            "id": "title",
                        },
                        {"type": "TextBlock", "text": "{{app_body}}", "wrap": True, "id": "body"},
                    ],
                    "actions": [
                        {
                            "type": "Action.OpenUrl",
                            "title": f"{{{{label{n}}}}}",
                            "url": f"{{{{url{n}}}}}",
                        }
                        for n in range(count)
                    ],
                    "msteams": {"width": "Full"},
                },
            }
        ],
    }


def card_template(count: int) -> Path:
    """The template file for ``count`` buttons (written on first use, readable by us only)."""
    global _folder
    with _lock:
        if _folder is None:
            _folder = Path(tempfile.mkdtemp(prefix="referral-watch-cards-"))  # mode 0700
        path = _folder / f"card-{count}.json"
        if not path.exists():
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(card(count), indent=1), encoding="utf-8")
            os.replace(partial, path)
        return path


def with_buttons(url: str, actions: Sequence[tuple[str, str]]) -> str:
    """The channel's workflow URL with the card template and each button's label and URL."""
    base, _, fragment = url.partition("#")
    arguments = [f"template={quote(str(card_template(len(actions))), safe='')}"]
    for n, (label, target) in enumerate(actions):
        arguments.append(f":label{n}={quote(label, safe='')}")
        arguments.append(f":url{n}={quote(target, safe='')}")
    joined = "&".join(arguments)
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}{joined}" + (f"#{fragment}" if fragment else "")
