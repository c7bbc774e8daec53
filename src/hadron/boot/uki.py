"""Assemble a Unified Kernel Image: a systemd-stub EFI binary with the kernel, initrd and their
configuration added as PE sections, ready to be signed for Secure Boot.

What goes in, in file order after the stub's own sections (the order ukify lays them out):
``.osrel``, ``.cmdline``, ``.uname``, ``.pcrpkey``, ``.initrd``, ``.linux``, then ``.pcrsig`` (the
signed PCR 11 predictions, ``hadron.measure``) computed over exactly the section contents written.
``.sbat`` is the stub's own SBAT section with the kernel's SBAT entries (when the kernel is a PE
with a ``.sbat`` section) and the caller's extra entries appended after it, under the single
``sbat,1,…`` header line SBAT requires first. The stub already has a ``.sbat`` section, and the
stub and shim read the first section of a name, so it is rewritten where it is when it fits in the
stub's address space before the next section, and otherwise moved after ``.linux``.

Layout: new sections follow the stub's last section, each starting at a multiple of
SectionAlignment in memory and FileAlignment in the file, with VirtualSize the exact data length
(what the stub measures and reads) and SizeOfRawData that rounded up to FileAlignment. ``.linux``
is marked as code (``IMAGE_SCN_CNT_CODE | IMAGE_SCN_MEM_READ``) like ukify does, so firmware
that maps images with NX keeps it executable for stubs that run the kernel in place; the others
are initialized read-only data. NumberOfSections, SizeOfImage, SizeOfHeaders,
SizeOfInitializedData/SizeOfCode and the checksum are recomputed, and the stub's obsolete COFF
symbol table is dropped.

PCR 11 is predicted for what the stub in the image measures: every UKI section name the stub
binary knows (its table of section names is read from the stub itself), in the canonical order.
systemd 252's stub knows no ``.uname``/``.sbat``; later stubs measure them too.

Every input is checked before anything is written; the output is written to a temporary file in
the same directory and renamed over ``out``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pefile  # type: ignore[import-untyped]

from hadron.boot import measure
from hadron.errors import HadronError

SBAT_HEADER = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md"
STUB_MAGIC = re.compile(rb"#### LoaderInfo: systemd-stub ([^ \0]+) ####")
# File order of the sections a build writes (ukify's order; .sbat only when it has to move).
LAYOUT_ORDER: tuple[str, ...] = (".osrel", ".cmdline", ".uname", ".pcrpkey", ".initrd", ".linux", ".sbat", ".pcrsig")

_SCN = pefile.SECTION_CHARACTERISTICS
DATA_CHARACTERISTICS: int = _SCN["IMAGE_SCN_CNT_INITIALIZED_DATA"] | _SCN["IMAGE_SCN_MEM_READ"]
LINUX_CHARACTERISTICS: int = _SCN["IMAGE_SCN_CNT_CODE"] | _SCN["IMAGE_SCN_MEM_READ"]
IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
SECTION_HEADER_SIZE = 40
_DIR_SECURITY = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_SECURITY"]
_DIR_DEBUG = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]


@dataclass(frozen=True)
class SectionInfo:
    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    characteristics: int


@dataclass(frozen=True)
class UkiInfo:
    path: Path
    size: int
    stub_version: str
    sections: tuple[SectionInfo, ...]  # every section of the image, in section table order
    written: tuple[str, ...]  # the sections this build wrote (added or rewritten), in file order
    measured: tuple[str, ...]  # what the stub extends into PCR 11, in measurement order
    pcr11: dict[str, list[dict[str, Any]]]  # expected PCR 11 values (measure.calculate's form)
    pcrsig: dict[str, list[dict[str, Any]]] | None  # the .pcrsig object, when signed


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _section_name(section: Any) -> str:
    return bytes(section.Name).rstrip(b"\0").decode("ascii", errors="replace")


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise HadronError(f"{what} {path} does not exist", hint="check the path") from e
    except IsADirectoryError as e:
        raise HadronError(f"{what} {path} is a directory, not a file") from e
    except OSError as e:
        raise HadronError(f"cannot read {what} {path}: {e.strerror}") from e


def _parse_pe(data: bytes, path: Path, what: str, hint: str) -> Any:
    if data[:2] != b"MZ":
        raise HadronError(f"{what} {path} is not a PE/EFI binary (no MZ header)", hint=hint)
    try:
        return pefile.PE(data=data, fast_load=True)
    except pefile.PEFormatError as e:
        raise HadronError(f"{what} {path} is not a valid PE/EFI binary: {e}", hint=hint) from e


def section_data(pe: Any, section: Any) -> bytes:
    """A section's contents as loaded: VirtualSize bytes, zero-filled past its raw data."""
    size = section.Misc_VirtualSize or section.SizeOfRawData
    raw = bytes(pe.__data__[section.PointerToRawData : section.PointerToRawData + min(size, section.SizeOfRawData)])
    return raw + bytes(size - len(raw))


def stub_known_sections(pe: Any) -> frozenset[str]:
    """The UKI section names a systemd-stub binary knows, read from its own string table.

    A stub measures every UKI section it knows except .pcrsig. The names are NUL-terminated
    strings in the stub's data; the section table (headers) is not searched.
    """
    blob = b"\0".join(section_data(pe, s) for s in pe.sections)
    return frozenset(
        name for name in measure.UKI_SECTIONS
        if re.search(rb"(?:^|\0)" + re.escape(name.encode()) + rb"\0", blob) is not None
    )


@dataclass(frozen=True)
class _Stub:
    path: Path
    data: bytes
    pe: Any
    version: str
    known: frozenset[str]
    sbat: bytes | None


def _load_stub(path: Path) -> _Stub:
    hint = "pass systemd-stub, e.g. /usr/lib/systemd/boot/efi/linuxx64.efi.stub (Debian package systemd-boot-efi)"
    data = _read_file(path, "stub")
    pe = _parse_pe(data, path, "stub", hint)
    names = [_section_name(s) for s in pe.sections]
    if pe.OPTIONAL_HEADER.Subsystem != IMAGE_SUBSYSTEM_EFI_APPLICATION:
        subsystem = pe.OPTIONAL_HEADER.Subsystem
        raise HadronError(f"stub {path} is not an EFI application (PE subsystem {subsystem})", hint=hint)
    magic = next((section_data(pe, s) for s in pe.sections if _section_name(s) == ".sdmagic"), b"")
    m = STUB_MAGIC.search(magic)
    if m is None:
        raise HadronError(f"{path} is not systemd-stub: no .sdmagic 'LoaderInfo: systemd-stub' marker", hint=hint)
    if ".linux" in names:
        raise HadronError(f"stub {path} already contains a .linux section: it is a UKI, not a stub", hint=hint)
    if pe.OPTIONAL_HEADER.DATA_DIRECTORY[_DIR_SECURITY].VirtualAddress != 0:
        raise HadronError(
            f"stub {path} is signed", hint="use the unsigned stub; sign the assembled UKI (hadron.secureboot.sign_efi)"
        )
    known = stub_known_sections(pe)
    if ".linux" not in known:
        raise HadronError(f"cannot find the table of UKI section names in stub {path}", hint=hint)
    sbat = next((section_data(pe, s) for s in pe.sections if _section_name(s) == ".sbat"), None)
    return _Stub(path, data, pe, m.group(1).decode("ascii", errors="replace"), known, sbat)


def _kernel_sbat(path: Path, data: bytes, machine: int) -> bytes | None:
    """Check the kernel is a PE/EFI image or an x86 bzImage; return its .sbat contents if it has one."""
    hint = "pass the kernel image (arch/x86/boot/bzImage, or the PE/EFI image of other architectures)"
    if not data:
        raise HadronError(f"kernel {path} is empty", hint=hint)
    is_bzimage = len(data) > 0x206 and data[0x202:0x206] == b"HdrS"
    if data[:2] != b"MZ":
        if is_bzimage:
            return None
        raise HadronError(f"kernel {path} is neither a PE/EFI image nor an x86 bzImage", hint=hint)
    try:
        pe = pefile.PE(data=data, fast_load=True)
    except pefile.PEFormatError as e:
        if is_bzimage:  # an x86 bzImage without the EFI stub
            return None
        raise HadronError(f"kernel {path} is not a valid PE/EFI image: {e}", hint=hint) from e
    if pe.FILE_HEADER.Machine != machine:
        raise HadronError(
            f"kernel {path} is for PE machine {pe.FILE_HEADER.Machine:#x}, the stub for {machine:#x}",
            hint="use the stub of the kernel's architecture",
        )
    return next((section_data(pe, s) for s in pe.sections if _section_name(s) == ".sbat"), None)


def _sbat_entries(text: str, where: str, *, needs_header: bool) -> list[str]:
    lines = [line.strip() for line in text.replace("\0", "").splitlines()]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith("sbat,"):
        lines = lines[1:]
    elif needs_header:
        raise HadronError(f"{where} is not an SBAT table (it does not start with an 'sbat,' line)")
    for line in lines:
        fields = line.split(",")
        if len(fields) != 6 or not fields[0] or not fields[1].isdigit() or int(fields[1]) < 1:
            raise HadronError(
                f"{where}: invalid SBAT entry {line!r}",
                hint="an entry is component,generation,vendor,package,version,url with a generation >= 1",
            )
        if fields[0] == "sbat":
            raise HadronError(f"{where}: the 'sbat' header line may only come first")
    return lines


def merge_sbat(stub_sbat: bytes | None, kernel_sbat: bytes | None, extra: str | None, *, stub: str = "stub",
               kernel: str = "kernel") -> bytes:
    """One SBAT table: the header line, then the stub's, the kernel's and the extra entries.

    shim checks every entry against its revocation level, so a component may appear more than
    once; identical entries are kept once.

    The result ends with a newline and a NUL byte, as systemd-stub's own .sbat does.
    """
    entries: list[str] = []
    for blob, where in ((stub_sbat, f"the .sbat section of {stub}"), (kernel_sbat, f"the .sbat section of {kernel}")):
        if blob is None:
            continue
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HadronError(f"{where} is not UTF-8 text") from e
        entries += _sbat_entries(text, where, needs_header=True)
    if extra is not None:
        entries += _sbat_entries(extra, "the extra SBAT entries", needs_header=False)
    # The same entry from two places (a kernel built from the same tree as the stub…) once.
    entries = list(dict.fromkeys(entries))
    return ("\n".join([SBAT_HEADER, *entries]) + "\n\0").encode()


def _text_section(value: str, name: str, *, single_word: bool = False) -> bytes:
    if "\0" in value:
        raise HadronError(f"the {name} contains a NUL character")
    if not value.strip():
        hint = None
        if name == "kernel command line":
            hint = "without a built-in command line the stub would take one from the boot loader, unmeasured by policy"
        raise HadronError(f"the {name} is empty", hint=hint)
    if single_word and (not value.isprintable() or any(c.isspace() for c in value)):
        raise HadronError(f"the {name} {value!r} must be one printable word (the kernel's `uname -r`)")
    return value.encode("utf-8")


def read_uki_sections(path: Path, *, uki_only: bool = False) -> dict[str, bytes]:
    """Section contents of a PE image by name, VirtualSize bytes each; the first of a name wins.

    ``uki_only`` keeps only the UKI sections (``hadron.measure.UKI_SECTIONS``).
    """
    data = _read_file(path, "image")
    pe = _parse_pe(data, path, "image", "pass a UKI or another PE/EFI binary")
    out: dict[str, bytes] = {}
    for s in pe.sections:
        name = _section_name(s)
        if name not in out and (not uki_only or name in measure.UKI_SECTIONS):
            out[name] = section_data(pe, s)
    return out


def build_uki(
    stub: Path,
    out: Path,
    *,
    linux: Path,
    osrel: bytes,
    cmdline: str,
    initrd: Path | None,
    uname: str,
    sbat: str | None,
    pcr_private_key: Path | None,
    pcr_public_key: Path | None,
    pcr_banks: tuple[str, ...] = ("sha256",),
    pcr_phases: tuple[str, ...] = measure.DEFAULT_PHASES,
) -> UkiInfo:
    """Write a UKI to ``out`` and describe it.

    ``sbat`` holds extra SBAT entries (lines ``component,generation,vendor,package,version,url``;
    an ``sbat,…`` header line is allowed and dropped). With ``pcr_private_key`` the image gets a
    ``.pcrsig`` for ``pcr_phases`` in ``pcr_banks``, plus the initrd-only policy (measure.INITRD_PHASES
    under the reference "initrd", as ukify --sign-initrd-pcrs adds); ``.pcrpkey`` holds ``pcr_public_key`` (or the
    public half of the private key). Raises HadronError before writing anything when an input is
    missing or wrong.
    """
    st = _load_stub(stub)
    pe = st.pe
    kernel = _read_file(linux, "kernel")
    kernel_sbat = _kernel_sbat(linux, kernel, pe.FILE_HEADER.Machine)

    try:
        osrel_text = osrel.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HadronError("the os-release contents are not UTF-8 text") from e
    contents: dict[str, bytes] = {
        ".osrel": _text_section(osrel_text, "os-release"),
        ".cmdline": _text_section(cmdline, "kernel command line"),
        ".uname": _text_section(uname, "kernel release (uname)", single_word=True),
    }
    if pcr_private_key is not None:
        _, public_key = measure.load_pcr_keypair(pcr_private_key, pcr_public_key)
        contents[".pcrpkey"] = (
            _read_file(pcr_public_key, "PCR public key") if pcr_public_key else measure.public_key_pem(public_key)
        )
    elif pcr_public_key is not None:
        measure.load_pcr_public_key(pcr_public_key)
        contents[".pcrpkey"] = _read_file(pcr_public_key, "PCR public key")
    if initrd is not None:
        contents[".initrd"] = _read_file(initrd, "initrd")
        if not contents[".initrd"]:
            raise HadronError(f"initrd {initrd} is empty", hint="pass a cpio archive, or no initrd")
    contents[".linux"] = kernel
    contents[".sbat"] = merge_sbat(st.sbat, kernel_sbat, sbat, stub=str(stub), kernel=str(linux))
    measure.normalize_banks(pcr_banks)
    measure.normalize_phases(pcr_phases)

    # What the stub will see and measure: its own sections overridden by ours.
    image_sections = {n: section_data(pe, s) for s in reversed(pe.sections) if (n := _section_name(s))}
    image_sections.update(contents)
    uki_contents = {n: d for n, d in image_sections.items() if n in measure.UKI_SECTIONS}
    pcrsig = None
    if pcr_private_key is not None:
        pcrsig = measure.combine_signatures(
            measure.sign_policy(uki_contents, pcr_private_key, pcr_public_key, pcr_phases, pcr_banks,
                                known=st.known),
            measure.sign_policy(uki_contents, pcr_private_key, pcr_public_key, measure.INITRD_PHASES, pcr_banks,
                                known=st.known, policy_ref=measure.INITRD_POLICY_REF))
        contents[".pcrsig"] = measure.to_json(pcrsig)
    pcr11 = measure.calculate(uki_contents, pcr_phases, pcr_banks, known=st.known)
    measured = tuple(n for n, _ in measure.measured_sections(uki_contents, st.known))

    image, written = _layout(st, contents)
    _write_atomic(out, image)
    final = pefile.PE(data=image, fast_load=True)
    sections = tuple(
        SectionInfo(_section_name(s), s.VirtualAddress, s.Misc_VirtualSize, s.PointerToRawData, s.SizeOfRawData,
                    s.Characteristics)
        for s in final.sections
    )
    return UkiInfo(out, len(image), st.version, sections, written, measured, pcr11, pcrsig)


def _layout(st: _Stub, contents: dict[str, bytes]) -> tuple[bytes, tuple[str, ...]]:
    """The new image bytes, and the names written in file order."""
    pe = st.pe
    fa = pe.OPTIONAL_HEADER.FileAlignment
    sa = pe.OPTIONAL_HEADER.SectionAlignment
    stub_sections = list(pe.sections)
    names = [_section_name(s) for s in stub_sections]

    # A stub section that has the name of one of ours is rewritten in place when the new contents
    # fit before the next section in memory, and moved to the end otherwise.
    in_place: dict[int, bytes] = {}
    removed: set[int] = set()
    for name, data in contents.items():
        idx = [i for i, n in enumerate(names) if n == name]
        if len(idx) > 1:
            raise HadronError(f"stub {st.path} has {len(idx)} sections named {name}")
        if not idx:
            continue
        s = stub_sections[idx[0]]
        later = [t.VirtualAddress for t in stub_sections if t.VirtualAddress > s.VirtualAddress]
        if not later or len(data) <= min(later) - s.VirtualAddress:
            in_place[idx[0]] = data
        else:
            removed.add(idx[0])
    in_place_names = {names[i] for i in in_place}
    appended = [(n, contents[n]) for n in LAYOUT_ORDER if n in contents and n not in in_place_names]
    kept = [i for i in range(len(stub_sections)) if i not in removed]

    # Room for the section table: it must end before the first section's data, in the file and
    # in memory.
    table_start = stub_sections[0].get_file_offset()
    count = len(kept) + len(appended)
    table_end = table_start + SECTION_HEADER_SIZE * count
    limit = min(
        [s.PointerToRawData for s in stub_sections if s.SizeOfRawData]
        + [s.VirtualAddress for s in stub_sections]
    )
    headers_size = max(pe.OPTIONAL_HEADER.SizeOfHeaders, _round_up(table_end, fa))
    if headers_size > limit:
        room = (limit - table_start) // SECTION_HEADER_SIZE - len(stub_sections)
        raise HadronError(
            f"stub {st.path} has no room for {count - len(kept) + len(removed)} more section headers "
            f"(room for {max(room, 0)})",
            hint="use a systemd-stub built with room for the UKI's section headers (systemd's own build leaves room)",
        )

    image = bytearray(st.data[:headers_size])
    old_table_end = table_start + SECTION_HEADER_SIZE * len(stub_sections)
    image[table_start : max(table_end, old_table_end)] = bytes(max(table_end, old_table_end) - table_start)

    def place(raw: bytes) -> int:
        if not raw:
            return 0
        offset = _round_up(len(image), fa)
        image.extend(bytes(offset - len(image)))
        image.extend(raw)
        image.extend(bytes(_round_up(len(raw), fa) - len(raw)))
        return offset

    moved = False
    written: list[str] = []
    end_va = pe.OPTIONAL_HEADER.SizeOfImage
    for slot, i in enumerate(kept):
        s = stub_sections[i]
        if i in in_place:
            data = in_place[i]
            s.Misc_VirtualSize = len(data)
            s.PointerToRawData = place(data)
            s.SizeOfRawData = _round_up(len(data), fa)
            written.append(names[i])
        else:
            raw = st.data[s.PointerToRawData : s.PointerToRawData + s.SizeOfRawData]
            if len(raw) != s.SizeOfRawData:
                raise HadronError(f"stub {st.path}: section {names[i]} extends past the end of the file")
            offset = place(raw)
            moved |= bool(raw) and offset != s.PointerToRawData
            s.PointerToRawData = offset
            s.SizeOfRawData = _round_up(len(raw), fa)
        s.set_file_offset(table_start + SECTION_HEADER_SIZE * slot)
        end_va = max(end_va, s.VirtualAddress + max(s.Misc_VirtualSize, s.SizeOfRawData))
    if moved and pe.OPTIONAL_HEADER.DATA_DIRECTORY[_DIR_DEBUG].VirtualAddress:
        raise HadronError(
            f"stub {st.path} has a debug directory and its sections would have to move", hint="use a stripped stub"
        )

    for i in sorted(removed, reverse=True):
        pe.__structures__.remove(stub_sections[i])
        pe.sections.remove(stub_sections[i])
    next_va = _round_up(end_va, sa)
    for slot, (name, data) in enumerate(appended, start=len(kept)):
        s = pefile.SectionStructure(pe.__IMAGE_SECTION_HEADER_format__, pe=pe)
        s.__unpack__(bytes(SECTION_HEADER_SIZE))
        s.set_file_offset(table_start + SECTION_HEADER_SIZE * slot)
        s.Name = name.encode("ascii")
        s.Misc_VirtualSize = len(data)
        s.VirtualAddress = next_va
        s.PointerToRawData = place(data)
        s.SizeOfRawData = _round_up(len(data), fa)
        s.Characteristics = LINUX_CHARACTERISTICS if name == ".linux" else DATA_CHARACTERISTICS
        if name == ".linux":
            pe.OPTIONAL_HEADER.SizeOfCode += s.SizeOfRawData
        else:
            pe.OPTIONAL_HEADER.SizeOfInitializedData += s.SizeOfRawData
        pe.__structures__.append(s)
        pe.sections.append(s)
        next_va = _round_up(next_va + len(data), sa)
        written.append(name)

    pe.FILE_HEADER.NumberOfSections = count
    pe.FILE_HEADER.PointerToSymbolTable = 0
    pe.FILE_HEADER.NumberOfSymbols = 0
    pe.OPTIONAL_HEADER.SizeOfHeaders = headers_size
    pe.OPTIONAL_HEADER.SizeOfImage = next_va
    pe.OPTIONAL_HEADER.CheckSum = 0
    pe.__data__ = bytes(image)
    assembled = pefile.PE(data=bytes(pe.write()), fast_load=True)
    assembled.OPTIONAL_HEADER.CheckSum = assembled.generate_checksum()
    return bytes(assembled.write()), tuple(written)


def _write_atomic(out: Path, data: bytes) -> None:
    if out.is_dir():
        raise HadronError(f"output {out} is a directory", hint="pass the path of the .efi file to write")
    if not out.parent.is_dir():
        raise HadronError(f"output directory {out.parent} does not exist", hint="create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
