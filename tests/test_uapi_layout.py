"""The ctypes mirrors in grant_broker.uapi agree with the C headers, as gcc compiles them.

Two independent sources are compared with the Python mirrors:

* constants: every object-like ``#define`` each header adds (found with
  ``gcc -E -dM``, so a constant missing from a mirror fails) and the enum
  values listed below;
* structs: the manifest below, written from the headers, names every struct
  and field; a generated C program prints sizeof / alignment / offsetof /
  field size / signedness for each, and each mirror must have exactly those
  fields.

Each constant and struct is its own test id.

Where the machine's ``linux-libc-dev`` has a header (``/usr/include/xen/``,
``/usr/include/linux/``) that copy is compiled; the others (Xen's
``grant_table.h``, Qualcomm's ``mem-buf.h``) exist only in the reference
headers of ``../shared/seeds/``, which may not be copied into the repository
(see their README) and which CI always has beside the clone.  A missing header
fails its tests, naming the path; only a machine without gcc skips them.
"""

from __future__ import annotations

import ctypes
import enum
import re
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from grant_broker.uapi import evtchn, gntalloc, gntdev, grant_table, ioctl, mem_buf
from grant_broker.uapi.ioctl import flexible

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SEEDS = SHARED / "seeds"
SYSTEM_XEN = Path("/usr/include/xen")

GCC = shutil.which("gcc")

# Everything the uapi headers expect their includer to provide.  grant_table.h
# wants Xen's xen.h; these are the few definitions it actually uses.
PRELUDE = textwrap.dedent("""\
    #include <stddef.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <linux/types.h>
    #include <linux/ioctl.h>
    #define __user
    #define __XEN_INTERFACE_VERSION__ 0x00040e00
    typedef uint16_t domid_t;
    typedef uint32_t grant_ref_t;
    typedef uint64_t xen_pfn_t;
    #define ___DEFINE_XEN_GUEST_HANDLE(name, type) typedef struct { type *p; } __guest_handle_ ## name
    #define DEFINE_XEN_GUEST_HANDLE(name) ___DEFINE_XEN_GUEST_HANDLE(name, name)
    #define XEN_GUEST_HANDLE(name) __guest_handle_ ## name
    DEFINE_XEN_GUEST_HANDLE(xen_pfn_t);
    DEFINE_XEN_GUEST_HANDLE(uint64_t);
""")

# The ioctl helpers are checked against linux/ioctl.h itself, so its baseline
# must not already include it.
IOCTL_BASELINE = "#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n"


@dataclass(frozen=True)
class Header:
    """One C header and the Python module mirroring it."""

    key: str
    include: str  # the #include line
    files: tuple[Path, ...]  # must exist, or the header's tests fail
    module: ModuleType
    baseline: str = PRELUDE
    # Macros that are not integer constants, with the reason they are not compared.
    non_constants: dict[str, str] = field(default_factory=dict)
    # Enumerators are not macros, so -dM cannot find them: list them here.
    enumerators: tuple[str, ...] = ()
    # Only macros with these prefixes belong to the header (linux/ioctl.h
    # pulls in asm/ioctl.h's own guards and helpers).
    prefixes: tuple[str, ...] = ()


HEADERS: tuple[Header, ...] = (
    Header("ioctl", "#include <linux/ioctl.h>", (Path("/usr/include/linux/ioctl.h"),), ioctl,
           baseline=IOCTL_BASELINE, prefixes=("_IOC_",)),
    Header("grant_table", f'#include "{SEEDS / "grant_table.h"}"', (SEEDS / "grant_table.h",), grant_table,
           non_constants={"GNTTABOP_error_msgs": "string table; see test_gntst_messages_cover_the_header"}),
    Header("gntdev", "#include <xen/gntdev.h>", (SYSTEM_XEN / "gntdev.h",), gntdev),
    Header("gntalloc", "#include <xen/gntalloc.h>", (SYSTEM_XEN / "gntalloc.h",), gntalloc),
    Header("evtchn", "#include <xen/evtchn.h>", (SYSTEM_XEN / "evtchn.h",), evtchn),
    Header("mem_buf", f'#include "{SEEDS / "mem-buf.h"}"', (SEEDS / "mem-buf.h",), mem_buf,
           enumerators=("MEM_BUF_ION_MEM_TYPE", "MEM_BUF_MAX_MEM_TYPE")),
)
HEADER_BY_KEY = {h.key: h for h in HEADERS}

# Struct manifest, written from the headers: C type -> field paths.  Dotted
# paths reach into anonymous members; a path's children, when listed, must be
# exactly the nested ctypes type's fields.
STRUCTS: dict[str, dict[str, tuple[str, ...]]] = {
    "grant_table": {
        "struct grant_entry_v1": ("flags", "domid", "frame"),
        "struct grant_entry_header": ("flags", "domid"),
        "union grant_entry_v2": (
            "hdr",
            "full_page", "full_page.hdr", "full_page.pad0", "full_page.frame",
            "sub_page", "sub_page.hdr", "sub_page.page_off", "sub_page.length", "sub_page.frame",
            "transitive", "transitive.hdr", "transitive.trans_domid", "transitive.pad0", "transitive.gref",
            "__spacer",
        ),
    },
    "gntdev": {
        "struct ioctl_gntdev_grant_ref": ("domid", "ref"),
        "struct ioctl_gntdev_map_grant_ref": ("count", "pad", "index", "refs"),
        "struct ioctl_gntdev_unmap_grant_ref": ("index", "count", "pad"),
        "struct ioctl_gntdev_get_offset_for_vaddr": ("vaddr", "offset", "count", "pad"),
        "struct ioctl_gntdev_set_max_grants": ("count",),
        "struct ioctl_gntdev_unmap_notify": ("index", "action", "event_channel_port"),
        "struct gntdev_grant_copy_segment": (
            "source", "source.virt", "source.foreign",
            "source.foreign.ref", "source.foreign.offset", "source.foreign.domid",
            "dest", "dest.virt", "dest.foreign",
            "dest.foreign.ref", "dest.foreign.offset", "dest.foreign.domid",
            "len", "flags", "status",
        ),
        "struct ioctl_gntdev_grant_copy": ("count", "segments"),
        "struct ioctl_gntdev_dmabuf_exp_from_refs": ("flags", "count", "fd", "domid", "refs"),
        "struct ioctl_gntdev_dmabuf_exp_wait_released": ("fd", "wait_to_ms"),
        "struct ioctl_gntdev_dmabuf_imp_to_refs": ("fd", "count", "domid", "reserved", "refs"),
        "struct ioctl_gntdev_dmabuf_imp_release": ("fd", "reserved"),
    },
    "gntalloc": {
        "struct ioctl_gntalloc_alloc_gref": ("domid", "flags", "count", "index", "gref_ids"),
        "struct ioctl_gntalloc_dealloc_gref": ("index", "count"),
        "struct ioctl_gntalloc_unmap_notify": ("index", "action", "event_channel_port"),
    },
    "evtchn": {
        "struct ioctl_evtchn_bind_virq": ("virq",),
        "struct ioctl_evtchn_bind_interdomain": ("remote_domain", "remote_port"),
        "struct ioctl_evtchn_bind_unbound_port": ("remote_domain",),
        "struct ioctl_evtchn_unbind": ("port",),
        "struct ioctl_evtchn_notify": ("port",),
        "struct ioctl_evtchn_restrict_domid": ("domid",),
    },
    "mem_buf": {
        "struct acl_entry": ("vmid", "perms"),
        "struct mem_buf_ion_data": ("heap_id",),
        "struct mem_buf_alloc_ioctl_arg": (
            "size", "acl_list", "nr_acl_entries", "src_mem_type", "src_data",
            "dst_mem_type", "mem_buf_fd", "dst_data", "reserved0", "reserved1", "reserved2",
        ),
        "struct mem_buf_export_ioctl_arg": (
            "dma_buf_fd", "nr_acl_entries", "acl_list", "export_fd", "memparcel_hdl",
            "reserved0", "reserved1", "reserved2",
        ),
        "struct mem_buf_import_ioctl_arg": (
            "memparcel_hdl", "nr_acl_entries", "acl_list", "dma_buf_import_fd",
            "reserved0", "reserved1", "reserved2", "reserved3",
        ),
    },
}

# Structs the headers declare that are deliberately not mirrored.
NOT_MIRRORED = {
    # Hypercall arguments: userspace reaches the hypervisor only through
    # gntdev/gntalloc, whose own structs are mirrored instead.
    **{f"grant_table:{name}": "hypercall argument, not used from userspace" for name in (
        "gnttab_map_grant_ref", "gnttab_unmap_grant_ref", "gnttab_setup_table", "gnttab_dump_table",
        "gnttab_transfer", "gnttab_copy", "gnttab_copy_ptr", "gnttab_query_size",
        "gnttab_unmap_and_replace", "gnttab_set_version", "gnttab_get_status_frames",
        "gnttab_get_version", "gnttab_swap_grant_ref", "gnttab_cache_flush",
    )},
}

# Scalar typedefs a header defines (grant_ref_t is also in our prelude; the
# header's identical typedef only compiles if the two agree).
TYPEDEFS: dict[str, tuple[str, ...]] = {
    "grant_table": ("grant_ref_t", "grant_handle_t", "grant_status_t"),
}

# ---------------------------------------------------------------------------
# discovery (at collection time, so each constant is its own test id)


class Unavailable(Exception):
    """gcc is missing: skip, saying so."""


MISSING: dict[str, list[str]] = {
    h.key: [str(p) for p in h.files if not p.exists()] for h in HEADERS if not all(p.exists() for p in h.files)
}
AVAILABLE = tuple(h for h in HEADERS if h.key not in MISSING)


def require_header(key: str) -> None:
    """Fail (never skip) the test of a header that is not there."""
    if key in MISSING:
        pytest.fail(
            f"C header not found: {', '.join(MISSING[key])}. The reference headers are not in the repository; "
            f"they are read from ../shared/seeds/ beside the clone (expected at {SEEDS}).",
            pytrace=False,
        )


def _cpp_macros(source: str) -> dict[str, str]:
    """Object-like macros defined after preprocessing ``source``: name -> body."""
    assert GCC is not None
    proc = subprocess.run([GCC, "-std=gnu11", "-E", "-dM", "-x", "c", "-"], input=source,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gcc -E failed:\n{proc.stderr}")
    macros = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"#define (\w+)(\(?)\s*(.*)$", line)
        if m and not m.group(2):  # function-like macros are helpers, not constants
            macros[m.group(1)] = m.group(3)
    return macros


def _check_available() -> None:
    if GCC is None:
        raise Unavailable("gcc not found on PATH; cannot compile the C headers")


def _discover_constants() -> dict[str, list[str]]:
    """Header key -> integer constant names the header itself defines (headers that are there)."""
    _check_available()
    found: dict[str, list[str]] = {}
    baselines: dict[str, dict[str, str]] = {}
    for h in AVAILABLE:
        base = baselines.setdefault(h.baseline, _cpp_macros(h.baseline))
        added = _cpp_macros(h.baseline + h.include + "\n")
        names = [
            name for name, body in added.items()
            if name not in base
            and body  # include guards
            and name not in h.non_constants
            and (not h.prefixes or name.startswith(h.prefixes))
        ]
        found[h.key] = sorted(names) + list(h.enumerators)
    return found


try:
    CONSTANTS = _discover_constants()
    UNAVAILABLE: str | None = None
except Unavailable as exc:
    CONSTANTS = {}
    UNAVAILABLE = str(exc)


def _params(items: list[tuple[str, str]], id_of: Callable[[str], str] = str) -> list:  # type: ignore[type-arg]
    if UNAVAILABLE is not None:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=UNAVAILABLE), id="unavailable")]
    return [pytest.param(key, name, id=f"{key}:{id_of(name)}") for key, name in items]


# A missing header cannot list its constants: one test id stands for them, and fails.
CONSTANT_PARAMS = _params([(key, name) for key, names in CONSTANTS.items() for name in names]
                          + [(key, "(all)") for key in MISSING])
STRUCT_PARAMS = _params([(key, ctype) for key, structs in STRUCTS.items() for ctype in structs],
                        id_of=lambda ctype: ctype.split()[1])
TYPEDEF_PARAMS = _params([(key, name) for key, names in TYPEDEFS.items() for name in names])

# ---------------------------------------------------------------------------
# the C program


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _c_program() -> str:
    out = [PRELUDE]
    out += [h.include for h in AVAILABLE if h.baseline is PRELUDE]
    out.append("#define SIGNED(x) _Generic((x), signed char: 1, short: 1, int: 1, long: 1, long long: 1, default: 0)")
    out.append("int main(void) {")
    for key, names in CONSTANTS.items():
        for name in names:
            out.append(f'    printf("const {key} {name} %lld\\n", (long long)({name}));')
    for key, structs in STRUCTS.items():
        if key in MISSING:
            continue
        for ctype, paths in structs.items():
            q = _c_string(ctype)
            out.append(f'    printf("size %s %zu %zu\\n", {q}, sizeof({ctype}), _Alignof({ctype}));')
            for path in paths:
                member = f"(({ctype} *)0)->{path}"
                out.append(
                    f'    printf("field %s %s %zu %zu %d\\n", {q}, "{path}", offsetof({ctype}, {path}), '
                    f"sizeof({member}), SIGNED({member}));"
                )
    for key, typedef_names in TYPEDEFS.items():
        if key in MISSING:
            continue
        for name in typedef_names:
            out.append(f'    printf("typedef {name} %zu %d\\n", sizeof({name}), SIGNED(({name})0));')
    if "grant_table" not in MISSING:
        out.append('    printf("errmsgs %zu\\n", sizeof((const char *[])GNTTABOP_error_msgs) / sizeof(const char *));')
    out.append("    return 0;\n}")
    return "\n".join(out) + "\n"


@dataclass
class CLayout:
    """What the compiled program printed."""

    constants: dict[tuple[str, str], int] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # ctype -> (size, align)
    fields: dict[tuple[str, str], tuple[int, int, bool]] = field(default_factory=dict)  # -> (offset, size, signed)
    typedefs: dict[str, tuple[int, bool]] = field(default_factory=dict)
    errmsgs: int = 0


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLayout]:
    """Compile and run the generated program once per module."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    assert GCC is not None
    work = tmp_path_factory.mktemp("uapi_layout")
    src, exe = work / "layout.c", work / "layout"
    src.write_text(_c_program())
    # -Wno-comment: the seed grant_table.h opens a comment inside a comment.
    build = subprocess.run([GCC, "-std=gnu11", "-Wall", "-Wno-comment", "-o", str(exe), str(src)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"compiling {src} failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    layout = CLayout()
    for line in run.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "const":
            layout.constants[(rest[0], rest[1])] = int(rest[2])
        elif kind == "size":
            *words, size, align = rest
            layout.sizes[" ".join(words)] = (int(size), int(align))
        elif kind == "field":
            *words, path, offset, size, signed = rest
            layout.fields[(" ".join(words), path)] = (int(offset), int(size), signed == "1")
        elif kind == "typedef":
            layout.typedefs[rest[0]] = (int(rest[1]), rest[2] == "1")
        elif kind == "errmsgs":
            layout.errmsgs = int(rest[0])
    yield layout


# ---------------------------------------------------------------------------
# helpers on the Python side


def _py_value(value: object) -> int:
    # C character constants ('G', 'M') are ints; the mirrors keep them as the
    # one-character strings the _IOC helpers take.
    if isinstance(value, str) and len(value) == 1:
        return ord(value)
    assert isinstance(value, int) and not isinstance(value, bool), f"not an integer constant: {value!r}"
    return int(value)


def _py_type(module: ModuleType, ctype: str) -> type[ctypes.Structure] | type[ctypes.Union]:
    kind, name = ctype.split()
    py = getattr(module, name, None)
    assert py is not None, f"{module.__name__} has no mirror of {ctype}"
    expected = ctypes.Union if kind == "union" else ctypes.Structure
    assert isinstance(py, type) and issubclass(py, expected), f"{module.__name__}.{name} is not a ctypes {kind}"
    return py


def _field_names(ctype_: type) -> list[str]:
    return [f[0] for f in ctype_._fields_]  # type: ignore[attr-defined]


def _resolve(root: type, path: str) -> tuple[int, type]:
    """(offset, ctypes type) of a dotted field path inside ``root``."""
    offset, current = 0, root
    for part in path.split("."):
        assert part in _field_names(current), f"{current.__name__} has no field {part!r}"
        offset += getattr(current, part).offset
        current = dict(current._fields_)[part]  # type: ignore[attr-defined]
    return offset, current


def _is_signed(ctype_: type) -> bool:
    # Only plain signed integers count, matching the C side's _Generic.
    return getattr(ctype_, "_type_", None) in ("b", "h", "i", "l", "q") and not issubclass(ctype_, ctypes.Array)


# ---------------------------------------------------------------------------
# tests


@pytest.mark.parametrize(("key", "name"), CONSTANT_PARAMS)
def test_constant(c_layout: CLayout, key: str, name: str) -> None:
    require_header(key)
    module = HEADER_BY_KEY[key].module
    assert hasattr(module, name), f"{module.__name__} is missing {name}"
    assert _py_value(getattr(module, name)) == c_layout.constants[(key, name)]


@pytest.mark.parametrize(("key", "ctype"), STRUCT_PARAMS)
def test_struct(c_layout: CLayout, key: str, ctype: str) -> None:
    require_header(key)
    py = _py_type(HEADER_BY_KEY[key].module, ctype)
    paths = STRUCTS[key][ctype]

    # Same fields, same order, at every level the manifest spells out.
    parents = {p.rpartition(".")[0] for p in paths}
    for parent in sorted(parents):
        children = [p.rpartition(".")[2] for p in paths if p.rpartition(".")[0] == parent]
        nested = _resolve(py, parent)[1] if parent else py
        assert _field_names(nested) == children, f"{ctype} {parent or '(top)'}: fields differ"

    assert (ctypes.sizeof(py), ctypes.alignment(py)) == c_layout.sizes[ctype], f"{ctype}: (size, align) differ"
    for path in paths:
        offset, ftype = _resolve(py, path)
        c_offset, c_size, c_signed = c_layout.fields[(ctype, path)]
        assert (offset, ctypes.sizeof(ftype), _is_signed(ftype)) == (c_offset, c_size, c_signed), \
            f"{ctype}.{path}: (offset, size, signed) differ"


@pytest.mark.parametrize(("key", "name"), TYPEDEF_PARAMS)
def test_typedef(c_layout: CLayout, key: str, name: str) -> None:
    require_header(key)
    py = getattr(HEADER_BY_KEY[key].module, name)
    assert (ctypes.sizeof(py), _is_signed(py)) == c_layout.typedefs[name]


@pytest.mark.parametrize("key", [h.key for h in HEADERS if h.key in STRUCTS or h.key == "ioctl"])
def test_every_declared_struct_is_in_the_manifest(key: str) -> None:
    """A struct added to a header must be mirrored (or excluded with a reason)."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    require_header(key)
    h = HEADER_BY_KEY[key]
    text = "".join(p.read_text() for p in h.files)
    declared = set(re.findall(r"^\s*(?:struct|union)\s+(\w+)\s*\{", text, re.MULTILINE))
    listed = {c.split()[1] for c in STRUCTS.get(key, {})}
    unlisted = {n for n in declared - listed if f"{key}:{n}" not in NOT_MIRRORED}
    assert not unlisted, f"{key}: structs in the header but not in the manifest: {sorted(unlisted)}"


@pytest.mark.parametrize("key", [h.key for h in HEADERS])
def test_mirror_has_nothing_unchecked(key: str) -> None:
    """Every integer constant and ctypes type a mirror defines is one the test compares."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    require_header(key)
    h = HEADER_BY_KEY[key]
    checked_types: set[type] = set()
    for ctype, paths in STRUCTS.get(key, {}).items():
        py = _py_type(h.module, ctype)
        checked_types.add(py)
        checked_types.update(_resolve(py, p)[1] for p in paths)
    extra_consts, extra_types = [], []
    for name, value in vars(h.module).items():
        if name.startswith("_IOC") and key != "ioctl":
            continue  # imported helpers, checked under "ioctl"
        if isinstance(value, type) and issubclass(value, (ctypes.Structure, ctypes.Union)) \
                and value.__module__ == h.module.__name__ and value not in checked_types:
            extra_types.append(name)
        elif isinstance(value, int) and not isinstance(value, (bool, enum.Enum)) and name not in CONSTANTS[key]:
            extra_consts.append(name)
        elif isinstance(value, enum.Enum) and name not in CONSTANTS[key]:
            extra_consts.append(name)
    assert not extra_consts, f"{h.module.__name__}: constants not found in the header: {extra_consts}"
    assert not extra_types, f"{h.module.__name__}: ctypes types not in the manifest: {extra_types}"


def test_gntst_messages_cover_the_header(c_layout: CLayout) -> None:
    """One name and one message of our own for each entry of GNTTABOP_error_msgs."""
    require_header("grant_table")
    statuses = [c_layout.constants[("grant_table", n)] for n in CONSTANTS["grant_table"] if n.startswith("GNTST_")]
    assert sorted(statuses, reverse=True) == list(range(0, -c_layout.errmsgs, -1))
    for status in statuses:
        assert grant_table.gntst_name(status) == f"{grant_table.GNTST_NAMES[status]}"
        assert not grant_table.gntst_message(status).startswith("unknown")
    assert grant_table.gntst_name(-99) == "GNTST(-99)"
    assert grant_table.gntst_message(-99) == "unknown grant status -99"
    assert grant_table.gntst_name(grant_table.GNTST_bad_gntref) == "GNTST_bad_gntref"


# ---------------------------------------------------------------------------
# variable-length arguments (no C needed: the fixed part is checked above)

FLEX = [
    (gntdev.ioctl_gntdev_map_grant_ref, gntdev.ioctl_gntdev_grant_ref),
    (gntdev.ioctl_gntdev_dmabuf_exp_from_refs, ctypes.c_uint32),
    (gntdev.ioctl_gntdev_dmabuf_imp_to_refs, ctypes.c_uint32),
    (gntalloc.ioctl_gntalloc_alloc_gref, ctypes.c_uint32),
]


@pytest.mark.parametrize(("base", "elem"), FLEX, ids=[b.__name__ for b, _ in FLEX])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 1024])
def test_flexible_layout(base: type[ctypes.Structure], elem: type, count: int) -> None:
    flex = flexible(base, count)
    last = base._fields_[-1][0]
    n = max(count, 1)
    offset = getattr(base, last).offset
    # The kernel copies count elements starting at the array's offset; the
    # struct then rounds up to its alignment, as C would.  (For
    # ioctl_gntalloc_alloc_gref that rounding swallows the one-element array's
    # tail padding, so sizeof(base) + (n - 1) * sizeof(elem) would overshoot.)
    align = ctypes.alignment(base)
    assert ctypes.sizeof(flex) == -(-(offset + n * ctypes.sizeof(elem)) // align) * align
    assert ctypes.sizeof(flex) >= ctypes.sizeof(base)
    assert getattr(flex, last).offset == offset
    assert ctypes.alignment(flex) == align
    assert _field_names(flex) == _field_names(base)
    assert flexible(base, count) is flex


def test_map_grant_ref_for() -> None:
    arg = gntdev.map_grant_ref_for(3, [(1, 10), (2, 20)])
    assert arg.count == 3
    assert ctypes.sizeof(arg) == ctypes.sizeof(gntdev.ioctl_gntdev_map_grant_ref) + 2 * ctypes.sizeof(gntdev.ioctl_gntdev_grant_ref)
    assert [(r.domid, r.ref) for r in arg.refs] == [(1, 10), (2, 20), (0, 0)]
    with pytest.raises(ValueError):
        gntdev.map_grant_ref_for(1, [(1, 1), (1, 2)])
    with pytest.raises(ValueError):
        gntdev.map_grant_ref_for(-1)


def test_other_builders() -> None:
    exp = gntdev.dmabuf_exp_from_refs_for(2, [7, 8])
    assert (exp.count, list(exp.refs)) == (2, [7, 8])
    imp = gntdev.dmabuf_imp_to_refs_for(4)
    assert (imp.count, len(imp.refs)) == (4, 4)
    alloc = gntalloc.alloc_gref_for(5, 3, writable=False)
    assert (alloc.domid, alloc.count, alloc.flags, len(alloc.gref_ids)) == (5, 3, 0, 3)
    acl = mem_buf.acl_list_for([(mem_buf.MEM_BUF_VMID_TRUSTED_VM, mem_buf.MEM_BUF_PERM_FLAG_READ)])
    assert (acl[0].vmid, acl[0].perms) == (1, 1)
    with pytest.raises(ValueError):
        mem_buf.acl_list_for([])
    with pytest.raises(ValueError):
        mem_buf.acl_list_for([(0, 0x8)])


def test_ioc_rejects_overflow() -> None:
    with pytest.raises(ValueError):
        ioctl._IOC(ioctl._IOC_NONE, "G", 256, 0)
    with pytest.raises(ValueError):
        ioctl._IOC(ioctl._IOC_NONE, "G", 0, 1 << ioctl._IOC_SIZEBITS)
    nr = ioctl._IOWR("M", 2, mem_buf.mem_buf_import_ioctl_arg)
    assert (ioctl._IOC_DIR(nr), chr(ioctl._IOC_TYPE(nr)), ioctl._IOC_NR(nr), ioctl._IOC_SIZE(nr)) == (
        ioctl._IOC_READ | ioctl._IOC_WRITE, "M", 2, ctypes.sizeof(mem_buf.mem_buf_import_ioctl_arg))
