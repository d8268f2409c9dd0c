"""Checks on untrusted BPF C source before any compiler sees it.

A submitted source may include `vmlinux.h`, libbpf's `<bpf/*.h>`, the kernel's `<scx/*.h>` and
`<asm-generic/errno.h>` — nothing else. Anything that lets the preprocessor or the assembler open a
file is refused: other `#include`s (and `#include_next`, `#import`, computed includes), `#embed`,
`__has_include`/`__has_embed` probes, file-reading pragmas (`#pragma GCC dependency`, `_Pragma`,
`__pragma`), and `.incbin` in inline assembly.

The directives are read the way the C preprocessor reads them (translation phases 1-3): backslash
line continuations are spliced, comments become a space (so a comment cannot hide or split a
directive), `%:` is `#`, and trigraphs are refused outright. These checks are the first wall with
a clear message; the second is that the compiler runs in the toolchain chroot with `-nostdinc`, no
network and only the allowlisted include directories, and `compile.py` checks the list of files
the compiler actually opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .models import VerifyError

MAX_SOURCE_BYTES = 256 * 1024

# Header names a source may include (relative to the allowlisted include directories).
ALLOWED_HEADERS = [
    re.compile(r"vmlinux\.h"),
    re.compile(r"bpf/[A-Za-z0-9_]+(\.bpf)?\.h"),
    re.compile(r"scx/[A-Za-z0-9_]+(\.bpf)?\.h"),
    re.compile(r"asm-generic/errno(-base)?\.h"),
]
ALLOWED_HEADERS_TEXT = '"vmlinux.h", <bpf/*.h>, <scx/*.h>, <asm-generic/errno.h>'

# Pragmas that only steer code generation or diagnostics (checked on the pragma's first words).
ALLOWED_PRAGMAS = re.compile(
    r"(once|unroll|nounroll|pack|push_macro|pop_macro|"
    r"GCC (unroll|diagnostic)|clang (loop|unroll|diagnostic|attribute))\b"
)

# Licenses the kernel treats as GPL-compatible (include/linux/license.h).
GPL_COMPATIBLE = {"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL",
                  "Dual MPL/GPL"}

_TRIGRAPH = re.compile(r"\?\?[=/'()!<>\-]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LICENSE = re.compile(r'\bSEC\s*\(\s*"license"\s*\)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass
class _Text:
    """Source after phases 1-3, with the physical line each character came from."""

    text: str
    lines: list[int]

    def line_at(self, i: int) -> int:
        return self.lines[min(i, len(self.lines) - 1)] if self.lines else 1


def _clean(source: str) -> _Text:
    """Splice continuations and replace comments by a space; keep string/char literals."""
    out: list[str] = []
    lines: list[int] = []
    line = 1
    i, n = 0, len(source)

    def skip_splices(j: int) -> int:
        nonlocal line
        # backslash, optional horizontal whitespace (clang accepts it), newline
        while j < n and source[j] == "\\":
            k = j + 1
            while k < n and source[k] in " \t\f\v":
                k += 1
            if k < n and source[k] == "\n":
                line += 1
                j = k + 1
            elif k + 1 < n and source[k] == "\r" and source[k + 1] == "\n":
                line += 1
                j = k + 2
            else:
                break
        return j

    def peek(j: int) -> tuple[str, int]:
        """The character at j after splices, and the index after it."""
        j = skip_splices(j)
        return (source[j], j + 1) if j < n else ("", j)

    while True:
        c, i2 = peek(i)
        if not c:
            break
        here = line
        if c == "/":
            c2, i3 = peek(i2)
            if c2 == "/":  # line comment: to the end of the (spliced) line
                i = i3
                while True:
                    c3, i4 = peek(i)
                    if not c3 or c3 == "\n":
                        break
                    i = i4
                out.append(" "), lines.append(here)
                continue
            if c2 == "*":
                i = i3
                while True:
                    c3, i4 = peek(i)
                    if not c3:
                        break
                    if c3 == "\n":
                        line += 1
                    if c3 == "*":
                        c4, i5 = peek(i4)
                        if c4 == "/":
                            i = i5
                            break
                    i = i4
                out.append(" "), lines.append(here)
                continue
        if c in "\"'":
            quote = c
            out.append(c), lines.append(here)
            i = i2
            while True:
                c3, i4 = peek(i)
                if not c3 or c3 == "\n":
                    break
                out.append(c3), lines.append(line)
                i = i4
                if c3 == "\\":
                    c4, i5 = peek(i)
                    if c4 and c4 != "\n":
                        out.append(c4), lines.append(line)
                        i = i5
                    continue
                if c3 == quote:
                    break
            continue
        if c == "\n":
            line += 1
        out.append(c), lines.append(here)
        i = i2
    return _Text("".join(out), lines)


def header_allowed(name: str, trusted_include_dirs: tuple[Path, ...] = ()) -> bool:
    if any(p.fullmatch(name) for p in ALLOWED_HEADERS):
        return True
    return _in_trusted_dir(name, trusted_include_dirs)


def _in_trusted_dir(name: str, dirs: tuple[Path, ...]) -> bool:
    """A relative name (no `..`) of a file that exists in an operator-trusted include directory."""
    if not name or name.startswith("/") or "\\" in name or ".." in Path(name).parts:
        return False
    for d in dirs:
        d = Path(d).resolve()
        p = (d / name).resolve()
        if p.is_file() and p.is_relative_to(d):
            return True
    return False


def _operand(rest: str) -> tuple[str | None, str]:
    """Parse `"name"` or `<name>` at the start of rest: (name or None, delimiter style)."""
    rest = rest.strip()
    m = re.match(r'"([^"\n]*)"|<([^>\n]*)>', rest)
    if not m:
        return None, ""
    return (m.group(1), '"') if m.group(1) is not None else (m.group(2), "<")


def _refusal_for_name(name: str, trusted: tuple[Path, ...]) -> str | None:
    if name.startswith("/"):
        return f'absolute include path "{name}" refused'
    if ".." in re.split(r"[/\\]", name):
        return f'include path "{name}" with ".." refused'
    if not header_allowed(name, trusted):
        return f'header "{name}" is not allowed (allowed: {ALLOWED_HEADERS_TEXT})'
    return None


def check_source(source: str, *, trusted_include_dirs: tuple[Path, ...] | list[Path] = ()
                 ) -> list[VerifyError]:
    """Every reason to refuse `source` before compiling it (empty list: go ahead)."""
    trusted = tuple(Path(d) for d in trusted_include_dirs)
    errors: list[VerifyError] = []
    size = len(source.encode("utf-8", "surrogatepass"))
    # clang ends a line at "\n", "\r\n" and a lone "\r": read lines the same way
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    source = source.removeprefix("\ufeff")  # clang skips a byte-order mark before the first line
    physical = source.split("\n")  # (not splitlines: it also splits at \f, \v, U+2028 ...)

    def refuse(code: str, message: str, line: int | None = None) -> None:
        snippet = physical[line - 1].rstrip() if line and 0 < line <= len(physical) else None
        errors.append(VerifyError(stage="source_check", code=code, message=message, line=line,
                                  file="source.bpf.c" if line else None, snippet=snippet))

    if size > MAX_SOURCE_BYTES:
        refuse("too_large", f"source is {size} bytes, the limit is {MAX_SOURCE_BYTES}")
        return errors
    if "\0" in source:
        refuse("nul_byte", "source contains a NUL byte", source[: source.index("\0")].count("\n") + 1)
        return errors
    for m in _TRIGRAPH.finditer(source):
        refuse("trigraph", f"trigraph {m.group()!r} refused (it can hide a directive or a line "
               "continuation)", source[: m.start()].count("\n") + 1)
    if errors:
        return errors

    t = _clean(source)
    offset = 0
    for logical in t.text.split("\n"):
        line_no = t.line_at(offset)
        _check_line(logical, line_no, trusted, refuse)
        offset += len(logical) + 1

    _check_tokens(t, trusted, refuse)

    m = _LICENSE.search(t.text)
    if not m:
        refuse("no_license", 'no license declared: add `char _license[] SEC("license") = "GPL";` '
               "(sched_ext schedulers must be GPL-compatible)")
    elif m.group(1) not in GPL_COMPATIBLE:
        refuse("license", f'license "{m.group(1)}" is not GPL-compatible (use one of: '
               f'{", ".join(sorted(GPL_COMPATIBLE))})', t.line_at(m.start()))
    return errors


def _check_line(logical: str, line_no: int, trusted, refuse) -> None:
    s = logical.lstrip(" \t\f\v\r")
    if s.startswith("%:"):
        s = s[2:]
    elif s.startswith("#"):
        s = s[1:]
    else:
        return
    s = s.lstrip(" \t\f\v")
    m = _IDENT.match(s)
    if not m:
        return
    directive, rest = m.group(), s[m.end():]
    if directive in ("include", "include_next", "import"):
        name, _ = _operand(rest)
        if name is None:
            refuse("computed_include", f"#{directive} must name a header literally "
                   '("name.h" or <name.h>); computed includes are refused', line_no)
        elif directive != "include":
            refuse("include_not_allowed", f"#{directive} is refused; use #include", line_no)
        elif why := _refusal_for_name(name, trusted):
            refuse("include_not_allowed", why, line_no)
    elif directive == "embed":
        refuse("embed", "#embed is refused (it reads a file into the program)", line_no)
    elif re.search(r"include|import|embed", directive):  # e.g. clang's #__include_macros
        refuse("include_not_allowed", f"#{directive} is refused", line_no)
    elif directive == "pragma":
        body = rest.strip()
        if not ALLOWED_PRAGMAS.match(body):
            refuse("pragma", f'"#pragma {body}" is refused (allowed: once, unroll, pack, '
                   "diagnostic, loop pragmas)", line_no)


def _check_tokens(t: _Text, trusted, refuse) -> None:
    """Operators that work anywhere, not only in directives: __has_include, _Pragma, .incbin."""
    text = t.text
    for m in re.finditer(r"\b(__has_include_next|__has_include|__has_embed|_Pragma|__pragma)\b", text):
        word, after, line = m.group(1), text[m.end():], t.line_at(m.start())
        if word == "__has_embed":
            refuse("embed", "__has_embed is refused", line)
        elif word.startswith("__has_include"):
            a = re.match(r"\s*\(\s*(\"[^\"\n]*\"|<[^>\n]*>)\s*\)", after)
            if not a:
                refuse("computed_include", f"{word} must name a header literally", line)
                continue
            name = a.group(1)[1:-1]
            if word == "__has_include_next":
                refuse("include_not_allowed", "__has_include_next is refused", line)
            elif why := _refusal_for_name(name, trusted):
                refuse("include_not_allowed", f"{word}: {why}", line)
        else:
            a = re.match(r'\s*\(\s*"((?:[^"\\\n]|\\.)*)"\s*\)', after) if word == "_Pragma" else \
                re.match(r"\s*\(([^()\n]*)\)", after)
            body = a.group(1).replace('\\"', '"').strip() if a else None
            if body is None or not ALLOWED_PRAGMAS.match(body):
                refuse("pragma", f"{word}({body if body is not None else '...'}) is refused "
                       "(allowed: once, unroll, pack, diagnostic, loop pragmas)", line)

    # .incbin/.include in inline asm read files at assembly time. Look through string-literal
    # concatenation (".in" "cbin") and token pasting (in ## cbin); a plain `x.include` field is fine.
    joined = re.sub(r"\s*##\s*", "", re.sub(r'"\s*"', "", text))
    for pattern, what in ((r"incbin", "incbin"), (r"\.\s*include\s*\\?[\"<]", "include")):
        m = re.search(pattern, joined, re.IGNORECASE)
        if m:
            # the line: count newlines in `joined` up to the hit (joins never remove newlines
            # except inside `" \n "` runs, so this is the line or a little before it)
            line = joined[: m.start()].count("\n") + 1
            refuse("asm_file_read", f"'.{what}' is refused (an assembler directive that reads a file)",
                   t.line_at(_nth_line_start(text, line)))


def _nth_line_start(text: str, line: int) -> int:
    pos = 0
    for _ in range(line - 1):
        pos = text.find("\n", pos) + 1
    return pos


_LINE_MARKER = re.compile(r'^#\s*(\d+)\s+"((?:[^"\\]|\\.)*)"', re.MULTILINE)
_ASM_QUALIFIERS = {"volatile", "__volatile__", "__volatile", "goto", "inline", "__inline__", "__inline"}
_ASM_FILE_READ = re.compile(r"\.\s*(incbin|include)\b", re.IGNORECASE)
_PRAGMA_LINE = re.compile(r"^#pragma[ \t]*([^\n]*)", re.MULTILINE)
_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_C_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]+|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.S)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f", "a": "\a", "b": "\b",
                   "e": "\x1b", "\\": "\\", "'": "'", '"': '"', "?": "?"}

# Assembler directives inline assembly may use. The BPF assembly in libbpf's and the kernel's
# headers and in every repository policy uses none (it is instructions: `r1 = %[ctx]`, `call 12`,
# `may_goto`), so none are allowed: no `.incbin`/`.include` however spelled, and no `.macro`, `.irp`
# or `.rept` to spell them with.
ALLOWED_ASM_DIRECTIVES: frozenset[str] = frozenset()
_SYMBOL_ATTR = re.compile(r'\b(weakref|alias|__weakref__|__alias__)\s*\(\s*"((?:[^"\\\n]|\\.)*)"')
_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASM_DOT = re.compile(r"(?<![0-9])\.|\.(?![0-9])")


def decode_c_string(body: str) -> str:
    """The characters a C string literal's body stands for (escapes decoded, as the compiler does
    before handing an asm template to the assembler)."""
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "xuU":
            return chr(min(int(e[1:], 16), 0x10FFFF)) if e[0] != "x" else chr(int(e[1:], 16) & 0xFF)
        if e[0] in "01234567":
            return chr(int(e, 8) & 0xFF)
        return _SIMPLE_ESCAPES.get(e, e)
    return _C_ESCAPE.sub(one, body)


def _asm_template(text: str, pos: int) -> tuple[str, int] | None:
    """The asm template (string literals decoded and joined) that starts after an asm keyword at
    `pos` of preprocessor output, skipping qualifiers and line markers. None: no "(" follows (not
    an asm statement); end -1: a "(" without a plain string literal after it."""
    n = len(text)
    i = pos
    while True:  # qualifiers and whitespace up to "("
        while i < n and text[i].isspace():
            i += 1
        m = _IDENT.match(text, i)
        if m and m.group() in _ASM_QUALIFIERS:
            i = m.end()
            continue
        break
    if i >= n or text[i] != "(":
        return None  # not an asm statement or label (e.g. the word inside a string)
    i += 1
    parts: list[str] = []
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "#" and (i == 0 or text[i - 1] == "\n"):  # a line marker
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        m = _STRING.match(text, i)
        if not m:
            break
        parts.append(decode_c_string(m.group(1)))
        i = m.end()
    return ("".join(parts), i) if parts else ("", -1)


def asm_directives(template: str) -> list[str]:
    """Directives (`.name`) that start a statement of an assembler template, after any labels;
    statements end at newlines and `;`."""
    out = []
    for stmt in re.split(r"[\n\r;]", template):
        stmt = stmt.strip()
        while m := re.match(r"[A-Za-z0-9_.$]+\s*:\s*", stmt):  # labels
            stmt = stmt[m.end():]
        if stmt.startswith("."):
            m = re.match(r"\.[A-Za-z0-9_.$]*", stmt)
            out.append(m.group().lower())
    return out


def _origin(text: str, pos: int) -> tuple[str, int]:
    """(file, line) in the original sources of position `pos` of preprocessor output."""
    marker = None
    for marker in _LINE_MARKER.finditer(text, 0, pos):
        pass
    if marker is None:
        return "", text.count("\n", 0, pos) + 1
    return marker.group(2), int(marker.group(1)) + text.count("\n", marker.end(), pos) - 1


def _asm_keywords(text: str):
    """(start, end) of each `asm`/`__asm`/`__asm__` keyword (a literal search: 20x a \\b regex)."""
    ident = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
    pos = text.find("asm")
    while pos >= 0:
        a, b = pos, pos + 3
        while a > 0 and text[a - 1] in ident:
            a -= 1
        while b < len(text) and text[b] in ident:
            b += 1
        if text[a:b] in ("asm", "__asm", "__asm__"):
            yield a, b
        pos = text.find("asm", b)


def check_preprocessed(text: str) -> list[VerifyError]:
    """Checks on the preprocessor's output (`clang -E`), where every macro trick is expanded:
    inline-asm templates must not read files (.incbin/.include) and every pragma (also those made
    by `_Pragma`) must be allowlisted. Findings point at the source line via the line markers.
    Fast on the ~3 MB that vmlinux.h expands to: a few regex scans, line mapping only on a hit."""
    errors: list[VerifyError] = []
    for start, end in _asm_keywords(text):
        got = _asm_template(text, end)
        if got is None:
            continue
        if got[1] < 0:
            f, line = _origin(text, start)
            errors.append(VerifyError(stage="compile", code="asm_unreadable", file=f, line=line,
                                      message="inline assembly whose template is not a plain string "
                                      "literal is refused"))
            continue
        template = got[0]
        bad = _ASM_FILE_READ.search(template)
        directives = [d for d in asm_directives(template) if d not in ALLOWED_ASM_DIRECTIVES]
        if not directives and not ALLOWED_ASM_DIRECTIVES and _ASM_DOT.search(template):
            directives = ["."]  # a dot anywhere but inside a number: a directive behind a quoted
            # label, a macro-built one, a local label — BPF instructions have no use for it
        if bad or directives:
            f, line = _origin(text, start)
            what = f".{bad.group(1).lower()}" if bad else directives[0]
            errors.append(VerifyError(stage="compile", code="asm_file_read" if bad else "asm_directive",
                                      file=f, line=line,
                                      message=f"inline assembly with '{what}' is refused ("
                                      + ("an assembler directive that reads a file)" if bad else
                                         "assembler directives are not allowed in inline assembly)")))
    # A symbol name is printed into the assembly unquoted where it looks like one: a weakref or
    # alias target must be a plain C identifier, not text for the assembler.
    for m in _SYMBOL_ATTR.finditer(text):
        name = decode_c_string(m.group(2))
        if not _C_IDENT.fullmatch(name):
            f, line = _origin(text, m.start())
            errors.append(VerifyError(stage="compile", code="asm_directive", file=f, line=line,
                                      message=f"{m.group(1)}({name[:60]!r}) is refused: the symbol "
                                      "must be a C identifier"))
    # and no string anywhere spells a file-reading directive, however escaped
    if "incbin" in text.lower() or "include" in text.lower() or "\\" in text:
        for m in _STRING.finditer(text):
            if "\\" in m.group(1) or "inc" in m.group(1).lower():
                bad = _ASM_FILE_READ.search(decode_c_string(m.group(1)))
                if bad:
                    f, line = _origin(text, m.start())
                    errors.append(VerifyError(stage="compile", code="asm_file_read", file=f, line=line,
                                              message=f"a string spelling '.{bad.group(1).lower()}' "
                                              "is refused (an assembler directive that reads a file)"))
    for m in _PRAGMA_LINE.finditer(text):
        body = m.group(1).strip()
        if not ALLOWED_PRAGMAS.match(body):
            f, line = _origin(text, m.start())
            errors.append(VerifyError(stage="compile", code="pragma", file=f, line=line,
                                      message=f'"#pragma {body}" is refused'))
    seen, unique = set(), []
    for e in errors:  # one finding per (what, where): a template is also a string
        if (e.code, e.file, e.line) not in seen:
            seen.add((e.code, e.file, e.line))
            unique.append(e)
    return unique
