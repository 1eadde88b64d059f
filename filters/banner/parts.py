"""Where the banner goes in a message's structure: the parts a reader shows as its text,
and the wrapping that puts the whole body under the banner where no part can carry it."""

from __future__ import annotations

from ..mime import Message, Part

PROTECTED = frozenset({"multipart/signed", "multipart/encrypted",
                       "application/pkcs7-mime", "application/x-pkcs7-mime"})
_BESIDE_THE_BODY = frozenset({"text/calendar", "application/ics"})    # an invitation, shown with the body


def chosen_parts(part: Part) -> list[Part]:
    """The parts that get the banner, in order (see the banner module's docstring)."""
    if part.content_type in PROTECTED:
        return []
    if part.is_leaf:
        # RFC 2183: a disposition a reader does not know makes an attachment, not the body
        takes = part.content_type in ("text/plain", "text/html") and part.disposition in (None, "inline")
        return [part] if takes and part.filename is None else []
    if not part.is_multipart:           # an embedded message: somebody else's text
        return []
    if part.content_type == "multipart/related":        # RFC 2387: the root is what is shown
        root = related_root(part)
        return chosen_parts(root) if root is not None else []
    if part.content_type == "multipart/alternative":      # the reader shows one, often the last:
        found = []                                         # each must carry the banner
        for child in part.children:
            chosen = chosen_parts(child)
            if not chosen and child.content_type not in _BESIDE_THE_BODY:
                return []
            found += chosen
        return found
    for child in part.children:
        chosen = chosen_parts(child)
        if chosen:
            return chosen
    return []


def related_root(part: Part) -> Part | None:
    """The root of a multipart/related: the part its ``start`` parameter names by Content-ID,
    else the first (RFC 2387 3.2); None when ``start`` names no part (a reader's guess)."""
    start = part.param("start")
    if not start:
        return part.children[0] if part.children else None
    wanted = start.strip().strip("<>").strip()
    return next((child for child in part.children
                 if (child.headers.get("Content-ID") or "").strip().strip("<>").strip() == wanted), None)


def wrap(message: Message, carrier: Part, position: str, *, whole: bool = True) -> None:
    """Put the message's body under a new multipart/mixed beside ``carrier``.

    ``whole``: the whole message is attached as message/rfc822, every byte kept (a
    signature stays valid).  Else the message's own MIME entity -- its Content-* fields
    and its body, byte for byte -- becomes the other part, shown inline as it was (as
    Mailman's decorate does where a footer cannot go in place).  The new top part keeps
    the original's header fields except the Content-* ones.
    """
    root = message.root
    eol = root.headers.eol
    if whole:       # parsed again within the message's limits; opaque where the parser gives up
        inner = Part.new_message([("Content-Description", "original message")],
                                 message.parse_again(bytes(root.to_bytes()), 1), eol=eol)
    else:
        content = b"".join(raw for name, raw in root.headers.fields() if name.lower().startswith("content-"))
        inner = message.parse_again(content + (root.separator or eol) + root.body_bytes(), 1)
    children = [carrier, inner] if position == "top" else [inner, carrier]
    outer = Part.new_multipart("mixed", children, eol=eol)
    headers = root.headers
    for name in {n for n in headers.names() if n.lower().startswith("content-")}:
        headers.remove(name)
    if "MIME-Version" not in headers:
        headers.add("MIME-Version", "1.0", top=False)
    headers.add("Content-Type", outer.headers.get("Content-Type") or "", top=False)
    outer.headers = headers
    message.root = outer


def is_wrapped(root: Part, carrier: Part, position: str) -> bool:
    """Is ``root`` a multipart/mixed of two whose first (top) or last (bottom) part is the
    banner's ``carrier``, word for word: where :func:`wrap` puts it, and nowhere else."""
    if root.content_type != "multipart/mixed" or len(root.children) != 2:
        return False
    found = root.children[0 if position == "top" else 1]
    return _texts_of(found) == _texts_of(carrier)


def _texts_of(part: Part) -> list[tuple[str, bytes]]:
    leaves = [part] if part.is_leaf else part.children if part.content_type == "multipart/alternative" else []
    return [(leaf.content_type, leaf.decoded()) for leaf in leaves if leaf.is_leaf]
