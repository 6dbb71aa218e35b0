"""Safe XML reading: no DTD, no entities, no network, bounded size; schema errors made readable."""

from __future__ import annotations

import codecs
import encodings.aliases
import functools
import re
from pathlib import Path

from lxml import etree

from ..core.errors import JobError, Location
from ..core.files import read_input

MAX_JOB_BYTES = 1 << 20
SCHEMA_FILE = Path(__file__).with_name("schema") / "job.xsd"
_FORBIDDEN = (b"<!DOCTYPE", b"<!ENTITY")
_DTD_PROBLEM = ("document type and entity declarations are refused "
                "(they enable entity-expansion and external-entity attacks)")
_DTD_HINT = "remove the <!DOCTYPE ...> block; job files need neither DTDs nor entities"
_DECLARED_ENCODING = re.compile(rb"\A(\xef\xbb\xbf)?(<\?xml\s[^>]*?\bencoding\s*=\s*([\"']))([^\"'>]*)(?=\3)")


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True,
    )


@functools.cache
def schema() -> etree.XMLSchema:
    """The job schema shipped with the package (compiled once per process)."""
    return etree.XMLSchema(etree.parse(str(SCHEMA_FILE), _parser()))


def read_xml(path: Path, raw: bytes | None = None) -> tuple[etree._Element, str]:
    """Parse ``path`` (or its recorded bytes ``raw``) safely and check it against the job schema; the root
    element and the file's text (decoded as it declares: UTF-8, UTF-16 ...). Raise JobError on any problem."""
    if raw is None:
        raw = read_input(path, path, "job file", MAX_JOB_BYTES,
                         hint="check the path; `autocnnp new JOB.xml` writes a starter job")
    for marker in _FORBIDDEN:
        at = raw.upper().find(marker)
        if at >= 0:
            line = raw.count(b"\n", 0, at) + 1
            raise JobError(Location(path, line, 1), _DTD_PROBLEM, _DTD_HINT)
    parsed = _with_libxml2_encoding_name(raw)
    try:
        root = etree.fromstring(parsed, _parser(), base_url=str(path)).getroottree().getroot()
    except etree.XMLSyntaxError as exc:
        line, col = exc.position if exc.position else (exc.lineno or 0, 0)
        message = re.sub(r", line \d+, column \d+$", "", exc.msg or str(exc))
        hint = ("save the file as UTF-8 and declare encoding=\"UTF-8\"" if _unknown_encoding(message)
                else "fix the markup at that position (every <tag> needs its </tag>)")
        raise JobError(Location(path, line, max(col, 1)), f"malformed XML: {message}", hint) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:  # a DTD in an encoding the byte scan cannot see
        try:
            text = raw.decode(docinfo.encoding or "utf-8", "replace")
        except LookupError:
            text = ""
        line = text.count("\n", 0, max(text.upper().find("<!DOCTYPE"), 0)) + 1
        raise JobError(Location(path, line, 1), _DTD_PROBLEM, _DTD_HINT)
    validator = schema()
    if not validator.validate(root):
        raise _schema_error(path, validator.error_log.filter_from_errors()[0]) from None
    return root, raw.decode(docinfo.encoding or "utf-8", "replace")


def _with_libxml2_encoding_name(raw: bytes) -> bytes:
    """``raw`` with its declared encoding renamed to a name libxml2 knows when only Python's codecs know
    the declared one (``latin-1``, ``utf_8``, ``euc_jp`` ...); unchanged otherwise."""
    declared = _DECLARED_ENCODING.match(raw)
    if declared is None:
        return raw
    name = declared.group(4).decode("ascii", "replace")
    known = _libxml2_name(name)
    if known is None or known == name:
        return raw
    return raw[:declared.start(4)] + known.encode("ascii") + raw[declared.end(4):]


@functools.lru_cache(maxsize=64)
def _libxml2_name(declared: str) -> str | None:
    """``declared`` if libxml2 knows it, else the first of the names Python's codecs give the same codec
    that libxml2 knows; None when neither knows the encoding."""
    if _libxml2_knows(declared):
        return declared
    codec = _codec_name(declared)
    if codec is None:
        return None
    aliases = [alias for alias, module in encodings.aliases.aliases.items()
               if _codec_name(module) == codec]
    for name in [codec, *aliases]:
        for spelling in dict.fromkeys((name, name.replace("_", "-"), name.replace("_", ""))):
            if _libxml2_knows(spelling):
                return spelling
    return None


def _codec_name(name: str) -> str | None:
    """The name of Python's codec for ``name``, if it knows one."""
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return None


def _libxml2_knows(name: str) -> bool:
    """Whether libxml2 parses a document declaring ``encoding=name``."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name):  # XML's EncName production
        return False
    try:
        etree.fromstring(f'<?xml version="1.0" encoding="{name}"?><a/>'.encode("ascii"), _parser())
    except etree.XMLSyntaxError as exc:
        return not _unknown_encoding(str(exc))
    return True


def _unknown_encoding(message: str) -> bool:
    return "Unsupported encoding" in message or "encoding name" in message


_ELEMENT = re.compile(r"Element '([^']+)'")


@functools.cache
def _required() -> frozenset[str]:
    """Names of the elements the schema declares as required somewhere (no minOccurs="0")."""
    xs = "{http://www.w3.org/2001/XMLSchema}element"
    doc = etree.parse(str(SCHEMA_FILE), _parser())
    return frozenset(el.get("name") for el in doc.iter(xs) if el.get("minOccurs", "1") != "0")


def _schema_error(path: Path, err) -> JobError:
    """Turn the first libxml2 schema error into a JobError with a fix hint."""
    where = Location(path, err.line, max(err.column, 1))
    message = err.message.replace("{http://www.w3.org/2001/XMLSchema}", "xs:")
    element = (_ELEMENT.search(message) or [None, "?"])[1]
    if "This element is not expected" in message:
        expected = re.search(r"Expected is (?:one of )?\( ?([^)]+)\)", message)
        hint = (f"allowed here: {expected.group(1).strip()}" if expected
                else "remove it or move it to its section; see the job file reference in the docs (reference/job-file)")
        return JobError(where, f"<{element}> is not allowed at this place", hint)
    if "Missing child element" in message:
        expected = re.search(r"Expected is (?:one of )?\( ?([^)]+)\)", message)
        names = [n.strip() for n in expected.group(1).split(",")] if expected else ["a required child"]
        names = [n for n in names if n in _required()] or names  # libxml2 also lists optional ones
        return JobError(where, f"<{element}> lacks {', '.join(names)}", f"add <{names[0]}>")
    if "attribute" in message and "is required" in message:
        attr = re.search(r"The attribute '([^']+)'", message)
        name = attr.group(1) if attr else "?"
        return JobError(where, f"<{element}> needs the attribute {name}=\"...\"", f"add {name}=\"...\" to <{element}>")
    if "is not an element of the set" in message:
        return JobError(where, f"{message.split(': ', 1)[-1]}", "use class=\"extensible\" or class=\"non_extensible\"")
    if "The attribute" in message and "is not allowed" in message:
        return JobError(where, message.split(": ", 1)[-1], f"remove that attribute from <{element}>")
    return JobError(where, f"schema violation: {message}", "see the job file reference in the docs (reference/job-file)")
