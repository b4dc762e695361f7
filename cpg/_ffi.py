"""The C declarations of libcpg / libquorum, and loading them in cffi ABI mode.

Theory of operation
-------------------
ulogd must run without a compiler or corosync's development headers, so the bindings use cffi's
*ABI mode*: the declarations below are written by hand (from corosync 3.x's ``corotypes.h``,
``cpg.h`` and ``quorum.h``) and the shared libraries are opened with ``ffi.dlopen`` on first use.

The price of ABI mode is that nothing checks these declarations against the real headers at run
time.  ``tests/cpg/test_header_selfcheck.py`` does that once per test run: it compiles the very
same :data:`CDEF` text in cffi *API mode* against ``/usr/include/corosync`` and compares every
constant, type size and field offset (see :func:`layout_facts`).  Change a declaration here and
the self-check says whether the header agrees.

Only what ulogd uses is declared; zero-copy buffers and group iteration are left out.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import cffi

#: corotypes.h: the shared error codes, dispatch flags and tracking flags.
CDEF_COMMON = """
typedef enum {
    CS_DISPATCH_ONE = 1,
    CS_DISPATCH_ALL = 2,
    CS_DISPATCH_BLOCKING = 3,
    CS_DISPATCH_ONE_NONBLOCKING = 4
} cs_dispatch_flags_t;

#define CS_TRACK_CURRENT 0x01
#define CS_TRACK_CHANGES 0x02
#define CS_TRACK_CHANGES_ONLY 0x04

typedef enum {
    CS_OK = 1,
    CS_ERR_LIBRARY = 2,
    CS_ERR_VERSION = 3,
    CS_ERR_INIT = 4,
    CS_ERR_TIMEOUT = 5,
    CS_ERR_TRY_AGAIN = 6,
    CS_ERR_INVALID_PARAM = 7,
    CS_ERR_NO_MEMORY = 8,
    CS_ERR_BAD_HANDLE = 9,
    CS_ERR_BUSY = 10,
    CS_ERR_ACCESS = 11,
    CS_ERR_NOT_EXIST = 12,
    CS_ERR_NAME_TOO_LONG = 13,
    CS_ERR_EXIST = 14,
    CS_ERR_NO_SPACE = 15,
    CS_ERR_INTERRUPT = 16,
    CS_ERR_NAME_NOT_FOUND = 17,
    CS_ERR_NO_RESOURCES = 18,
    CS_ERR_NOT_SUPPORTED = 19,
    CS_ERR_BAD_OPERATION = 20,
    CS_ERR_FAILED_OPERATION = 21,
    CS_ERR_MESSAGE_ERROR = 22,
    CS_ERR_QUEUE_FULL = 23,
    CS_ERR_QUEUE_NOT_AVAILABLE = 24,
    CS_ERR_BAD_FLAGS = 25,
    CS_ERR_TOO_BIG = 26,
    CS_ERR_NO_SECTIONS = 27,
    CS_ERR_CONTEXT_NOT_FOUND = 28,
    CS_ERR_TOO_MANY_GROUPS = 30,
    CS_ERR_SECURITY = 100
} cs_error_t;

struct iovec {
    void *iov_base;
    size_t iov_len;
};
"""

#: cpg.h (libcpg.so.4).
CDEF_CPG = """
typedef uint64_t cpg_handle_t;

typedef enum {
    CPG_TYPE_UNORDERED,
    CPG_TYPE_FIFO,
    CPG_TYPE_AGREED,
    CPG_TYPE_SAFE
} cpg_guarantee_t;

typedef enum {
    CPG_FLOW_CONTROL_DISABLED,
    CPG_FLOW_CONTROL_ENABLED
} cpg_flow_control_state_t;

typedef enum {
    CPG_REASON_UNDEFINED = 0,
    CPG_REASON_JOIN = 1,
    CPG_REASON_LEAVE = 2,
    CPG_REASON_NODEDOWN = 3,
    CPG_REASON_NODEUP = 4,
    CPG_REASON_PROCDOWN = 5
} cpg_reason_t;

typedef enum {
    CPG_MODEL_V1 = 1
} cpg_model_t;

struct cpg_address {
    uint32_t nodeid;
    uint32_t pid;
    uint32_t reason;
};

#define CPG_MAX_NAME_LENGTH 128
#define CPG_MEMBERS_MAX 128
#define CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF 1

struct cpg_name {
    uint32_t length;
    char value[128];
};

struct cpg_ring_id {
    uint32_t nodeid;
    uint64_t seq;
};

typedef void (*cpg_deliver_fn_t) (
    cpg_handle_t handle, const struct cpg_name *group_name,
    uint32_t nodeid, uint32_t pid, void *msg, size_t msg_len);

typedef void (*cpg_confchg_fn_t) (
    cpg_handle_t handle, const struct cpg_name *group_name,
    const struct cpg_address *member_list, size_t member_list_entries,
    const struct cpg_address *left_list, size_t left_list_entries,
    const struct cpg_address *joined_list, size_t joined_list_entries);

typedef void (*cpg_totem_confchg_fn_t) (
    cpg_handle_t handle, struct cpg_ring_id ring_id,
    uint32_t member_list_entries, const uint32_t *member_list);

typedef struct {
    cpg_model_t model;
} cpg_model_data_t;

typedef struct {
    cpg_model_t model;
    cpg_deliver_fn_t cpg_deliver_fn;
    cpg_confchg_fn_t cpg_confchg_fn;
    cpg_totem_confchg_fn_t cpg_totem_confchg_fn;
    unsigned int flags;
} cpg_model_v1_data_t;

cs_error_t cpg_model_initialize (cpg_handle_t *handle, cpg_model_t model,
                                 cpg_model_data_t *model_data, void *context);
cs_error_t cpg_finalize (cpg_handle_t handle);
cs_error_t cpg_fd_get (cpg_handle_t handle, int *fd);
cs_error_t cpg_max_atomic_msgsize_get (cpg_handle_t handle, uint32_t *size);
cs_error_t cpg_dispatch (cpg_handle_t handle, cs_dispatch_flags_t dispatch_types);
cs_error_t cpg_join (cpg_handle_t handle, const struct cpg_name *group);
cs_error_t cpg_leave (cpg_handle_t handle, const struct cpg_name *group);
cs_error_t cpg_mcast_joined (cpg_handle_t handle, cpg_guarantee_t guarantee,
                             const struct iovec *iovec, unsigned int iov_len);
cs_error_t cpg_membership_get (cpg_handle_t handle, struct cpg_name *groupName,
                               struct cpg_address *member_list, int *member_list_entries);
cs_error_t cpg_local_get (cpg_handle_t handle, unsigned int *local_nodeid);
cs_error_t cpg_flow_control_state_get (cpg_handle_t handle,
                                       cpg_flow_control_state_t *flow_control_enabled);
"""

#: quorum.h (libquorum.so.5), the v0 model: one notification, no struct passed by value.
CDEF_QUORUM = """
typedef uint64_t quorum_handle_t;

#define QUORUM_FREE 0
#define QUORUM_SET 1

typedef void (*quorum_notification_fn_t) (
    quorum_handle_t handle, uint32_t quorate, uint64_t ring_seq,
    uint32_t view_list_entries, uint32_t *view_list);

typedef struct {
    quorum_notification_fn_t quorum_notify_fn;
} quorum_callbacks_t;

cs_error_t quorum_initialize (quorum_handle_t *handle, quorum_callbacks_t *callbacks,
                              uint32_t *quorum_type);
cs_error_t quorum_finalize (quorum_handle_t handle);
cs_error_t quorum_fd_get (quorum_handle_t handle, int *fd);
cs_error_t quorum_dispatch (quorum_handle_t handle, cs_dispatch_flags_t dispatch_types);
cs_error_t quorum_getquorate (quorum_handle_t handle, int *quorate);
cs_error_t quorum_trackstart (quorum_handle_t handle, unsigned int flags);
cs_error_t quorum_trackstop (quorum_handle_t handle);
"""

#: Everything, in the order it must be given to ``ffi.cdef``.
CDEF = CDEF_COMMON + CDEF_CPG + CDEF_QUORUM

#: The C headers these declarations describe (for the API-mode self-check).
HEADERS = ("sys/uio.h", "corosync/corotypes.h", "corosync/cpg.h", "corosync/quorum.h")

#: Shared object names (sonames) opened at run time.
LIBCPG = "libcpg.so.4"
LIBQUORUM = "libquorum.so.5"


def make_ffi(cdef: str = CDEF) -> cffi.FFI:
    """Return a fresh FFI holding *cdef* (the self-check builds variants of it)."""
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


ffi = make_ffi()

_libs: dict[str, Any] = {}
_libs_lock = threading.Lock()


def load(soname: str) -> Any:
    """dlopen *soname* once with the module's FFI and return the library object.

    Raises :class:`OSError` naming the Debian package to install when the library is missing.
    """
    with _libs_lock:
        lib = _libs.get(soname)
        if lib is None:
            try:
                lib = ffi.dlopen(soname)
            except OSError as exc:
                raise OSError(
                    f"cannot load {soname} ({exc}); install corosync's client libraries "
                    "(Debian: apt-get install corosync, or libcpg4 / libquorum5)"
                ) from exc
            _libs[soname] = lib
        return lib


def define_names(cdef: str = CDEF) -> list[str]:
    """The ``#define`` integer constants declared in *cdef*."""
    return re.findall(r"^\s*#define\s+(\w+)\s", cdef, flags=re.MULTILINE)


def layout_facts(target: cffi.FFI, lib: Any, cdef: str = CDEF) -> dict[str, int]:
    """Every number the declarations in *cdef* imply, as ``{"what": value}``.

    *target* is an FFI built from *cdef* (ABI or API mode), *lib* an object on which the
    constants can be read (``ffi.dlopen(None)`` for ABI mode, the compiled module's ``lib`` for
    API mode).  The keys name the fact: ``const:CS_OK``, ``sizeof:struct cpg_name``,
    ``offsetof:struct cpg_name.value`` and ``fieldsize:struct cpg_name.value``.
    """
    facts: dict[str, int] = {}
    typedefs, structs, unions = target.list_types()
    type_names = sorted(typedefs) + [f"struct {s}" for s in sorted(structs)]
    type_names += [f"union {u}" for u in sorted(unions)]
    for name in type_names:
        ctype = target.typeof(name)
        if ctype.kind == "function":
            continue
        facts[f"sizeof:{name}"] = target.sizeof(ctype)
        facts[f"alignof:{name}"] = target.alignof(ctype)
        if ctype.kind == "enum":
            for const in ctype.relements:
                facts[f"const:{const}"] = getattr(lib, const)
        if ctype.kind in ("struct", "union"):
            for field, info in ctype.fields or ():
                facts[f"offsetof:{name}.{field}"] = target.offsetof(ctype, field)
                facts[f"fieldsize:{name}.{field}"] = target.sizeof(info.type)
    for const in define_names(cdef):
        facts[f"const:{const}"] = getattr(lib, const)
    return facts
