"""The few PKCS#11 calls the agent makes, through the standard library's ctypes.

No new package: ctypes is in every CPython (Yocto: python3-ctypes) and the
C API is stable since v2.20. Only what a rotation needs is bound: find the
token by label, log in, find/create/destroy objects, generate an EC key pair,
sign (CKM_ECDSA) and derive (CKM_ECDH1_DERIVE, for go-ecies).

The module is initialised once per process and never finalised: OpenSSL's
pkcs11-provider shares it for TLS in the same process (initialising again is
CKR_CRYPTOKI_ALREADY_INITIALIZED, which is fine), and finalising it under the
provider breaks the provider's sessions.

The PIN is held in memory only; no message here ever includes it.
"""

from __future__ import annotations

import ctypes
import threading

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CK_VOID_P = ctypes.c_void_p
CK_BYTE_P = ctypes.POINTER(ctypes.c_ubyte)
CK_ULONG_P = ctypes.POINTER(CK_ULONG)

# Object classes, key and certificate types
CKO_CERTIFICATE, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY = 1, 2, 3, 4
CKK_EC, CKK_GENERIC_SECRET = 0x3, 0x10
CKC_X_509 = 0
# Attributes
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_VALUE, CKA_CERTIFICATE_TYPE, CKA_ISSUER, CKA_SERIAL_NUMBER = 0x11, 0x80, 0x81, 0x82
CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE = 0x100, 0x101, 0x102, 0x103
CKA_SIGN, CKA_VERIFY, CKA_DERIVE = 0x108, 0x10A, 0x10C
CKA_VALUE_LEN, CKA_EXTRACTABLE, CKA_EC_PARAMS, CKA_EC_POINT = 0x161, 0x162, 0x180, 0x181
# Mechanisms and their flags
CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_ECDH1_DERIVE = 0x1040, 0x1041, 0x1050
CKF_DERIVE = 0x80000
CKD_NULL = 1
# Sessions and users
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_USER = 1
CKF_OS_LOCKING_OK = 0x2
CKF_TOKEN_INITIALIZED = 0x400

CKR_OK = 0
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_PIN_INCORRECT = 0xA0

# The return values an operator can act on; the others are reported by name and number.
_MEANINGS = {
    0x02: ("CKR_HOST_MEMORY", "the device is out of memory"),
    0x05: ("CKR_GENERAL_ERROR", "the token failed; check its logs"),
    0x06: ("CKR_FUNCTION_FAILED", "the token failed; check its logs"),
    0x30: ("CKR_DEVICE_ERROR", "the token failed; check its logs"),
    0x31: ("CKR_DEVICE_MEMORY", "the token is full: remove objects it no longer needs"),
    0x32: ("CKR_DEVICE_REMOVED", "the token was removed; reconnect it"),
    0x70: ("CKR_MECHANISM_INVALID", "the token does not support this operation"),
    0x82: ("CKR_OBJECT_HANDLE_INVALID", "an object vanished from the token meanwhile"),
    0xA0: ("CKR_PIN_INCORRECT", "the PIN is wrong: fix p11.pass in sota.toml (the token may lock "
                                "after a few more wrong PINs)"),
    0xA2: ("CKR_PIN_LEN_RANGE", "the PIN has the wrong length: fix p11.pass in sota.toml"),
    0xA3: ("CKR_PIN_EXPIRED", "the token's user PIN has expired: set a new one"),
    0xA4: ("CKR_PIN_LOCKED", "the token's user PIN is locked: unlock it with the SO PIN"),
    0xB3: ("CKR_SESSION_HANDLE_INVALID", "the token was reset meanwhile; run again"),
    0xD1: ("CKR_TEMPLATE_INCONSISTENT", "the token refused the object's attributes"),
    0xE0: ("CKR_TOKEN_NOT_PRESENT", "the token is not present; connect it"),
    0xE2: ("CKR_TOKEN_WRITE_PROTECTED", "the token is read-only"),
    0x101: ("CKR_USER_NOT_LOGGED_IN", "the token logged the agent out meanwhile; run again"),
    0x102: ("CKR_USER_PIN_NOT_INITIALIZED", "the token has no user PIN: initialise it"),
    0x140: ("CKR_CURVE_NOT_SUPPORTED", "the token does not support P-256"),
}

# CK_FUNCTION_LIST after its version, in the order of pkcs11f.h (v2.40).
_FUNCTIONS = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject C_DestroyObject "
    "C_GetObjectSize C_GetAttributeValue C_SetAttributeValue C_FindObjectsInit C_FindObjects "
    "C_FindObjectsFinal C_EncryptInit C_Encrypt C_EncryptUpdate C_EncryptFinal C_DecryptInit "
    "C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit C_Digest C_DigestUpdate C_DigestKey "
    "C_DigestFinal C_SignInit C_Sign C_SignUpdate C_SignFinal C_SignRecoverInit C_SignRecover "
    "C_VerifyInit C_Verify C_VerifyUpdate C_VerifyFinal C_VerifyRecoverInit C_VerifyRecover "
    "C_DigestEncryptUpdate C_DecryptDigestUpdate C_SignEncryptUpdate C_DecryptVerifyUpdate "
    "C_GenerateKey C_GenerateKeyPair C_WrapKey C_UnwrapKey C_DeriveKey C_SeedRandom "
    "C_GenerateRandom C_GetFunctionStatus C_CancelFunction C_WaitForSlotEvent"
).split()


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [(name, CK_VOID_P) for name in _FUNCTIONS]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", CK_VOID_P), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", CK_VOID_P), ("ulParameterLen", CK_ULONG)]


class CK_MECHANISM_INFO(ctypes.Structure):
    _fields_ = [("ulMinKeySize", CK_ULONG), ("ulMaxKeySize", CK_ULONG), ("flags", CK_ULONG)]


class CK_ECDH1_DERIVE_PARAMS(ctypes.Structure):
    _fields_ = [("kdf", CK_ULONG), ("ulSharedDataLen", CK_ULONG), ("pSharedData", CK_VOID_P),
                ("ulPublicDataLen", CK_ULONG), ("pPublicData", CK_VOID_P)]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [("CreateMutex", CK_VOID_P), ("DestroyMutex", CK_VOID_P), ("LockMutex", CK_VOID_P),
                ("UnlockMutex", CK_VOID_P), ("flags", CK_ULONG), ("pReserved", CK_VOID_P)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                ("flags", CK_ULONG), ("ulMaxSessionCount", CK_ULONG), ("ulSessionCount", CK_ULONG),
                ("ulMaxRwSessionCount", CK_ULONG), ("ulRwSessionCount", CK_ULONG),
                ("ulMaxPinLen", CK_ULONG), ("ulMinPinLen", CK_ULONG),
                ("ulTotalPublicMemory", CK_ULONG), ("ulFreePublicMemory", CK_ULONG),
                ("ulTotalPrivateMemory", CK_ULONG), ("ulFreePrivateMemory", CK_ULONG),
                ("hardwareVersion", CK_VERSION), ("firmwareVersion", CK_VERSION),
                ("utcTime", ctypes.c_char * 16)]


# name -> argument types (each returns CK_RV)
_SIGNATURES = {
    "C_Initialize": [CK_VOID_P],
    "C_GetSlotList": [ctypes.c_ubyte, CK_ULONG_P, CK_ULONG_P],
    "C_GetTokenInfo": [CK_ULONG, ctypes.POINTER(CK_TOKEN_INFO)],
    "C_GetMechanismInfo": [CK_ULONG, CK_ULONG, ctypes.POINTER(CK_MECHANISM_INFO)],
    "C_OpenSession": [CK_ULONG, CK_ULONG, CK_VOID_P, CK_VOID_P, CK_ULONG_P],
    "C_Login": [CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG],
    "C_CreateObject": [CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG, CK_ULONG_P],
    "C_DestroyObject": [CK_ULONG, CK_ULONG],
    "C_GetAttributeValue": [CK_ULONG, CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG],
    "C_FindObjectsInit": [CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG],
    "C_FindObjects": [CK_ULONG, CK_ULONG_P, CK_ULONG, CK_ULONG_P],
    "C_FindObjectsFinal": [CK_ULONG],
    "C_SignInit": [CK_ULONG, ctypes.POINTER(CK_MECHANISM), CK_ULONG],
    "C_Sign": [CK_ULONG, CK_BYTE_P, CK_ULONG, CK_BYTE_P, CK_ULONG_P],
    "C_GenerateKeyPair": [CK_ULONG, ctypes.POINTER(CK_MECHANISM), ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG,
                          ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG, CK_ULONG_P, CK_ULONG_P],
    "C_DeriveKey": [CK_ULONG, ctypes.POINTER(CK_MECHANISM), CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE),
                    CK_ULONG, CK_ULONG_P],
}


class TokenError(Exception):
    """A PKCS#11 call failed; ``hint`` says what the operator can do."""

    def __init__(self, message: str, *, hint: str, code: int | None = None):
        super().__init__(message)
        self.hint = hint
        self.code = code


def _check(rv: int, call: str, ok: tuple[int, ...] = ()) -> int:
    if rv == CKR_OK or rv in ok:
        return rv
    name, hint = _MEANINGS.get(rv, (f"CKR 0x{rv:x}", "check the token and its PKCS#11 module's logs"))
    raise TokenError(f"{call} failed: {name} (0x{rv:x})", hint=hint, code=rv)


_modules: dict[str, "Module"] = {}
_modules_lock = threading.Lock()


class Module:
    """A loaded PKCS#11 module (one per path per process)."""

    @classmethod
    def load(cls, path: str) -> "Module":
        with _modules_lock:
            module = _modules.get(path)
            if module is None:
                module = _modules[path] = cls(path)
            return module

    def __init__(self, path: str):
        self.path = path
        try:
            library = ctypes.CDLL(path)
            get_list = library.C_GetFunctionList
        except OSError as err:
            raise TokenError(f"cannot load the PKCS#11 module {path}: {err}",
                             hint="check p11.module in sota.toml names the token's module and that "
                             "it is installed") from err
        except AttributeError as err:
            raise TokenError(f"{path} is not a PKCS#11 module (no C_GetFunctionList)",
                             hint="check p11.module in sota.toml") from err
        functions = ctypes.POINTER(CK_FUNCTION_LIST)()
        get_list.restype = CK_RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST))]
        _check(get_list(ctypes.byref(functions)), "C_GetFunctionList")
        self._library = library  # keeps the module mapped while its functions are used
        self._calls = {}
        for name, argtypes in _SIGNATURES.items():
            address = getattr(functions.contents, name)
            self._calls[name] = ctypes.CFUNCTYPE(CK_RV, *argtypes)(address)
        args = CK_C_INITIALIZE_ARGS(flags=CKF_OS_LOCKING_OK)
        _check(self.call("C_Initialize", ctypes.byref(args)), "C_Initialize",
               ok=(CKR_CRYPTOKI_ALREADY_INITIALIZED,))

    def call(self, name: str, *args) -> int:
        return self._calls[name](*args)

    def token_slot(self, label: str) -> int:
        """The slot of the initialised token labelled ``label``."""
        count = CK_ULONG()
        _check(self.call("C_GetSlotList", 1, None, ctypes.byref(count)), "C_GetSlotList")
        slots = (CK_ULONG * max(count.value, 1))()
        _check(self.call("C_GetSlotList", 1, slots, ctypes.byref(count)), "C_GetSlotList")
        seen = []
        for slot in slots[:count.value]:
            info = CK_TOKEN_INFO()
            _check(self.call("C_GetTokenInfo", slot, ctypes.byref(info)), "C_GetTokenInfo")
            token_label = info.label.decode("utf-8", "replace").rstrip(" \0")
            if token_label == label and info.flags & CKF_TOKEN_INITIALIZED:
                return slot
            seen.append(token_label)
        raise TokenError(
            f"no token labelled {label!r} in {self.path} (tokens present: "
            f"{', '.join(repr(s) for s in seen) or 'none'})",
            hint="check p11.label in sota.toml (default \"aktualizr\") and that the token is present",
        )

    def supports_derive(self, slot: int) -> bool:
        info = CK_MECHANISM_INFO()
        rv = self.call("C_GetMechanismInfo", slot, CKM_ECDH1_DERIVE, ctypes.byref(info))
        return rv == CKR_OK and bool(info.flags & CKF_DERIVE)

    def open(self, label: str) -> "Session":
        """A read-write session on the token labelled ``label``."""
        slot = self.token_slot(label)
        handle = CK_ULONG()
        _check(self.call("C_OpenSession", slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None,
                         ctypes.byref(handle)), "C_OpenSession")
        return Session(self, slot, handle.value)


class _Template:
    """A CK_ATTRIBUTE array whose values stay alive as long as it does."""

    def __init__(self, attributes: dict[int, object]):
        self._buffers = []
        self.array = (CK_ATTRIBUTE * max(len(attributes), 1))()
        self.count = len(attributes)
        for index, (kind, value) in enumerate(attributes.items()):
            if isinstance(value, bool):
                raw = b"\x01" if value else b"\x00"
            elif isinstance(value, int):
                raw = bytes(CK_ULONG(value))
            else:
                raw = bytes(value)
            buffer = ctypes.create_string_buffer(raw, len(raw))
            self._buffers.append(buffer)
            self.array[index] = CK_ATTRIBUTE(kind, ctypes.cast(buffer, CK_VOID_P), len(raw))


class Session:
    """A token session: what a rotation does with the device's keys and certificates."""

    def __init__(self, module: Module, slot: int, handle: int):
        self.module = module
        self.slot = slot
        self.handle = handle

    def login(self, pin: str) -> None:
        """Log the user in (for every session of this process, as PKCS#11 has it)."""
        secret = pin.encode()
        _check(self.module.call("C_Login", self.handle, CKU_USER, secret, len(secret)), "C_Login",
               ok=(CKR_USER_ALREADY_LOGGED_IN,))

    def find(self, attributes: dict[int, object]) -> list[int]:
        template = _Template(attributes)
        call = self.module.call
        _check(call("C_FindObjectsInit", self.handle, template.array, template.count), "C_FindObjectsInit")
        found = []
        try:
            batch = (CK_ULONG * 16)()
            count = CK_ULONG()
            while True:  # until a batch comes back empty: a module may return short ones
                _check(call("C_FindObjects", self.handle, batch, 16, ctypes.byref(count)), "C_FindObjects")
                if count.value == 0:
                    return found
                found += batch[:count.value]
        finally:
            call("C_FindObjectsFinal", self.handle)

    def attribute(self, handle: int, kind: int) -> bytes:
        attribute = CK_ATTRIBUTE(kind, None, 0)
        _check(self.module.call("C_GetAttributeValue", self.handle, handle, ctypes.byref(attribute), 1),
               "C_GetAttributeValue")
        buffer = ctypes.create_string_buffer(attribute.ulValueLen)
        attribute.pValue = ctypes.cast(buffer, CK_VOID_P)
        _check(self.module.call("C_GetAttributeValue", self.handle, handle, ctypes.byref(attribute), 1),
               "C_GetAttributeValue")
        return buffer.raw[:attribute.ulValueLen]

    def create(self, attributes: dict[int, object]) -> int:
        template = _Template(attributes)
        handle = CK_ULONG()
        _check(self.module.call("C_CreateObject", self.handle, template.array, template.count,
                                ctypes.byref(handle)), "C_CreateObject")
        return handle.value

    def destroy(self, handle: int) -> None:
        _check(self.module.call("C_DestroyObject", self.handle, handle), "C_DestroyObject")

    def generate_key_pair(self, public: dict[int, object], private: dict[int, object]) -> tuple[int, int]:
        mechanism = CK_MECHANISM(CKM_EC_KEY_PAIR_GEN, None, 0)
        public_template, private_template = _Template(public), _Template(private)
        public_handle, private_handle = CK_ULONG(), CK_ULONG()
        _check(self.module.call("C_GenerateKeyPair", self.handle, ctypes.byref(mechanism),
                                public_template.array, public_template.count,
                                private_template.array, private_template.count,
                                ctypes.byref(public_handle), ctypes.byref(private_handle)),
               "C_GenerateKeyPair")
        return public_handle.value, private_handle.value

    def sign_ecdsa(self, key: int, digest: bytes) -> bytes:
        """The raw r || s signature of ``digest`` by ``key`` (CKM_ECDSA)."""
        mechanism = CK_MECHANISM(CKM_ECDSA, None, 0)
        call = self.module.call
        _check(call("C_SignInit", self.handle, ctypes.byref(mechanism), key), "C_SignInit")
        data = (ctypes.c_ubyte * len(digest)).from_buffer_copy(digest)
        size = CK_ULONG(132)  # r || s of P-521 at most
        out = (ctypes.c_ubyte * size.value)()
        _check(call("C_Sign", self.handle, data, len(digest), out, ctypes.byref(size)), "C_Sign")
        return bytes(out[:size.value])

    def ecdh(self, key: int, peer_point: bytes, size: int) -> bytes:
        """The raw ECDH shared secret (x coordinate, ``size`` bytes) of ``key`` and an
        uncompressed peer point (CKM_ECDH1_DERIVE, no KDF, a session-only secret)."""
        point = ctypes.create_string_buffer(peer_point, len(peer_point))
        params = CK_ECDH1_DERIVE_PARAMS(CKD_NULL, 0, None, len(peer_point), ctypes.cast(point, CK_VOID_P))
        mechanism = CK_MECHANISM(CKM_ECDH1_DERIVE, ctypes.cast(ctypes.pointer(params), CK_VOID_P),
                                 ctypes.sizeof(params))
        template = _Template({
            CKA_CLASS: CKO_SECRET_KEY, CKA_KEY_TYPE: CKK_GENERIC_SECRET, CKA_TOKEN: False,
            CKA_SENSITIVE: False, CKA_EXTRACTABLE: True, CKA_VALUE_LEN: size,
        })
        derived = CK_ULONG()
        _check(self.module.call("C_DeriveKey", self.handle, ctypes.byref(mechanism), key,
                                template.array, template.count, ctypes.byref(derived)), "C_DeriveKey")
        try:
            return self.attribute(derived.value, CKA_VALUE)
        finally:
            self.destroy(derived.value)
