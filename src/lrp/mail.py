"""Raw e-mail to the text the built-in spam classifier reads: the subject and the plain-text body.

``mail_text(raw)`` parses a message (RFC 5322, MIME) with Python's :mod:`email` package and returns
``subject + "\\n\\n" + body``, where the body is

- the ``text/plain`` parts (in a ``multipart/alternative``, the plain part; its HTML twin says the same),
- or, where a message or an alternative has no plain part, its ``text/html`` parts turned into plain text
  with :mod:`html.parser` (tags dropped, ``<script>``/``<style>``/comments skipped, block tags as line breaks,
  entities decoded),
- without attachments (parts with a file name), and with white space tidied (runs of spaces and blank lines
  collapsed).

No other header is read. The headers of the SpamAssassin corpus give the answer away: ``X-Spam-*`` lines
written by the collectors' own filters, mailing-list headers (``List-Id``, ``X-Mailman-Version``,
``X-Beenthere``: most ham in the corpus came from mailing lists, little spam did), ``Received`` chains and
``Delivered-To`` lines of the machines that collected each folder. A model that read them would learn how the
corpus was collected, not what spam says.

Two parts of subject and body carry the same give-aways and are removed too (:func:`strip_list_markers`):
mailing-list subject tags such as ``[ILUG]`` or ``[SAtalk]`` and the footers mailing-list software appends
(Mailman's "... mailing list / listinfo" block, SourceForge's "This sf.net email is sponsored by" block, the
Irish Linux Users' Group and Yahoo! Groups footers, a bare ``.../mailman/listinfo/...`` line).
"""

from __future__ import annotations

import email
import email.header
import email.policy
import html
import re
from email.message import Message
from html.parser import HTMLParser
from typing import Optional, Union

__all__ = ["mail_text", "mail_parts", "html_to_text", "strip_list_markers", "tidy", "looks_like_mail", "as_text",
           "mask_collectors"]

# tags after which text continues on a new line
_BLOCK = {"p", "div", "br", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "pre",
          "blockquote", "title", "center", "dd", "dt", "dl", "form", "option", "address", "section", "article",
          "header", "footer", "td", "th"}
_SKIP = {"script", "style", "head"}  # text inside these is not shown to the reader (``title`` is read out of head)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP:
            self.skip += 1
        if tag == "title":
            self.title = True
        if tag in _BLOCK:
            self.parts.append("\n")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and not self.skip:
                self.parts.append(f" {alt} ")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")
        elif tag == "img":
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self.skip:
            self.skip -= 1
        if tag == "title":
            self.title = False
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip or self.title:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The text an HTML part shows: tags dropped, scripts, styles and comments skipped, entities decoded."""
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # pragma: no cover - html.parser is lenient; a last resort for broken markup
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.parts)


def tidy(text: str) -> str:
    """Normalise white space: no ``\\r``, no non-breaking or zero-width spaces, runs of spaces and tabs as one
    space, no trailing spaces, at most one blank line in a row, none at the start or end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    text = re.sub(r"[\u200b\u200c\u200d\ufeff]", "", text)
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ----------------------------------------------------------------------------- corpus give-aways

# A subject tag put there by mailing-list software: "[ILUG]", "Re: [SAtalk] ...", "[zzzzteana] ..." (a short
# bracketed name of letters, digits and - _ . at the start of the subject or after "Re:"/"Fwd:").
_SUBJECT_TAG = re.compile(r"^((?:\s*(?:re|fw|fwd|aw)\s*:\s*)*)\[[A-Za-z][\w.\- ]{0,24}\]\s*", re.IGNORECASE)
_Q = r"(?:[>|] ?)*"  # quote marks: a reply quotes the footer of the message it answers
# Lines list software adds, removed wherever they stand (also quoted): a bare listinfo URL, Mailman's block
# (a line of underscores, "Name mailing list", the list's address), the Irish Linux Users' Group footer.
_LIST_LINES = re.compile(
    rf"^{_Q}[ \t]*(?:<?https?://\S+/(?:mailman/)?listinfo/\S*>?(?: for \(un\)subscription information\.?)?"
    rf"|List maintainer: \S+|Irish Linux Users' Group[^\n:]*: \S+)[ \t]*$\n?"
    rf"|^{_Q}_{{10,}}[ \t]*\n{_Q}[^\n]*mailing list[^\n]*\n(?:{_Q}[ \t]*\S+@\S+[ \t]*$\n?)?",
    re.MULTILINE | re.IGNORECASE)
# Footers that go on to the end of the body (within _FOOTER_REACH characters of it): the body is cut where
# they start. SourceForge's sponsor advert, the Yahoo! Groups sponsor box and terms of service.
_FOOTERS = [
    re.compile(rf"\n{_Q}-{{10,}}\n{_Q}[^\n]*sf\.net email is sponsored by", re.IGNORECASE),
    re.compile(rf"\n{_Q}[^\n]*sf\.net email is sponsored by", re.IGNORECASE),
    re.compile(rf"\n{_Q}[- ]*Yahoo! Groups Sponsor", re.IGNORECASE),
    re.compile(rf"\n{_Q}[^\n]*(?:To unsubscribe from this group, send an email to|Your use of Yahoo! Groups is "
               rf"subject)", re.IGNORECASE),
]
_FOOTER_REACH = 1500  # characters
_EMPTY_TAIL = re.compile(rf"(?:\n{_Q}[ \t]*(?:--)?[ \t]*)+\Z")  # trailing blank, quote-only or "--" lines
# The MIME boundary of the SpamAssassin-Sightings list, which forwarded much of the corpus's spam; where the
# forwarded HTML was not closed properly it shows up as text.
_SIGHTINGS_BOUNDARY = re.compile(rf"^{_Q}-*(?:DeathToSpam)+-*\s*$", re.MULTILINE | re.IGNORECASE)
# The corpus rewrote its collectors' own addresses (zzzz@..., yyyy@..., qqqqqqqqqq-...@, spamassassin.taint.org)
# and left some real ones (jm@netnoteinc.com, jm@jmason.org): which of them a mail was sent to says which folder
# it came from. Addresses and host names of theirs become ``user@example.com`` / ``example.com``, the bare
# user names ``zzzz`` and ``yyyy`` become ``user``.
_COLLECTOR_HOSTS = r"(?:[\w-]+\.)*(?:taint\.org|netnoteinc\.com|jmason\.org)\b"
_COLLECTOR_ADDRESS = re.compile(
    rf"[\w.+%=-]*@{_COLLECTOR_HOSTS}|[\w.+%=-]*(?:zzzz|yyyy|qqqqqqqqqq)[\w.+%=-]*@[\w.-]+\w", re.IGNORECASE)
_COLLECTOR_HOST = re.compile(_COLLECTOR_HOSTS, re.IGNORECASE)
_COLLECTOR_NAME = re.compile(r"\b(?:zzzz|yyyy)\b", re.IGNORECASE)


def mask_collectors(text: str) -> str:
    """Replace the corpus collectors' addresses and host names by neutral ones (see the comment above)."""
    text = _COLLECTOR_ADDRESS.sub("user@example.com", text)
    text = _COLLECTOR_HOST.sub("example.com", text)
    return _COLLECTOR_NAME.sub("user", text)


def strip_list_markers(subject: str, body: str) -> tuple[str, str]:
    """Remove what mailing-list software adds (subject tags such as ``[ILUG]``, list footers, also quoted ones),
    the SpamAssassin-Sightings list's MIME boundary and the corpus collectors' addresses (:func:`mask_collectors`)."""
    subject = mask_collectors(_SUBJECT_TAG.sub(lambda m: m.group(1), subject, count=1).strip())
    body = _LIST_LINES.sub("", _SIGHTINGS_BOUNDARY.sub("", "\n" + body))
    while True:
        body = _EMPTY_TAIL.sub("", body)
        start = max(0, len(body) - _FOOTER_REACH)
        cuts = [m.start() for p in _FOOTERS for m in p.finditer(body, start)]
        if not cuts:
            break
        body = body[:min(cuts)]
    return subject, mask_collectors(body).strip("\n")


# ----------------------------------------------------------------------------- MIME

def _decode(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def _is_attachment(part: Message) -> bool:
    return part.get_filename() is not None or (part.get("Content-Disposition") or "").lower().startswith("attach")


def _texts(part: Message) -> list[str]:
    """The plain text of one MIME part and what it contains."""
    if part.is_multipart():
        children = [p for p in (part.get_payload() or []) if isinstance(p, Message)]
        if part.get_content_subtype() == "alternative":
            plain = [p for p in children if p.get_content_type() == "text/plain"]
            if plain:
                children = plain
            elif children:  # the richest version the sender offered
                children = children[-1:]
        return [t for child in children for t in _texts(child)]
    if part.get_content_maintype() == "message":  # a forwarded message: its body, not its headers
        inner = part.get_payload()
        inner = inner if isinstance(inner, list) else [inner]
        return [t for p in inner if isinstance(p, Message) for t in _texts(p)]
    if _is_attachment(part):
        return []
    ctype = part.get_content_type()
    if ctype == "text/plain":
        return [_decode(part)]
    if ctype == "text/html":
        return [html_to_text(_decode(part))]
    return []


def _subject(msg: Message) -> str:
    raw = msg.get("Subject")
    if raw is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(raw))))
    except Exception:  # a malformed encoded word: the subject as it stands
        return str(raw)


def mail_parts(raw: Union[str, bytes, Message], *, strip_lists: bool = True) -> tuple[str, str]:
    """``(subject, body)`` of a raw e-mail (string, bytes or an :class:`email.message.Message`), as plain
    text, tidied; ``strip_lists`` removes mailing-list subject tags and footers (:func:`strip_list_markers`)."""
    if isinstance(raw, Message):
        msg = raw
    elif isinstance(raw, bytes):
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    else:
        msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = tidy(_subject(msg)).replace("\n", " ")
    body = tidy("\n\n".join(t for t in _texts(msg) if t.strip()))
    if strip_lists:
        subject, body = strip_list_markers(subject, body)
        body = tidy(body)
    return subject, body


def mail_text(raw: Union[str, bytes, Message], *, strip_lists: bool = True) -> str:
    """What the spam classifier reads of a raw e-mail: ``subject + "\\n\\n" + body`` (see the module docstring)."""
    subject, body = mail_parts(raw, strip_lists=strip_lists)
    return f"{subject}\n\n{body}" if body else subject


def looks_like_mail(text: str) -> bool:
    """Whether ``text`` starts with RFC 5322 headers (``Name: value`` lines, a ``From`` line allowed first): two
    or more, or a lone ``Subject:`` line. One other header-like line is read as text: a parsed mail (subject,
    blank line, body) whose subject starts like a header ("Date: Friday ...") is not parsed again."""
    head = text.lstrip().split("\n\n", 1)[0].split("\n")
    if head and head[0].startswith("From "):
        head = head[1:]
    fields = [ln for ln in head if ln and not ln[0].isspace()]
    if not fields or not all(re.match(r"^[!-9;-~]+:", ln) for ln in fields):
        return False
    named = [ln.lower().startswith(("subject:", "from:", "to:", "date:", "content-type:")) for ln in fields]
    return any(named) and (len(fields) >= 2 or fields[0].lower().startswith("subject:"))


def as_text(text_or_mail: str, *, raw: Optional[bool] = None) -> str:
    """Plain text as it is, or a raw e-mail parsed by :func:`mail_text` (``raw=None``: decided by
    :func:`looks_like_mail`)."""
    if raw is None:
        raw = looks_like_mail(text_or_mail)
    return mail_text(text_or_mail) if raw else text_or_mail
