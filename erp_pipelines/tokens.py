"""The token store: credentials an ERP hands out at runtime, encrypted at rest, readable only by the owner.

What it holds: session tokens (cached between runs, so a run does not mint a new session
each time) and, for ERPs with OAuth, the rotating refresh tokens that must survive from one run to
the next (losing the newest one loses the consent). Entries are keyed by a hash of the credential
they belong to (`credential_key`), never by the credential itself.

- One file (`ERP_TOKEN_STORE_PATH`, default `tokens.enc` next to the warehouse), the whole JSON
  document encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`).
- The key: `ERP_TOKEN_STORE_KEY` (a Fernet key, `TokenStore.generate_key()`), or else a key file
  next to the store (`tokens.key`), generated on first use with mode 0600.
- The store and the key file are created with mode 0600 and refused when group or others can read
  them. Writes go to a temporary file (0600) that atomically replaces the store, under a
  cross-process lock (`<store>.lock`), so concurrent runs never lose an update or see half a file.
- A wrong key or a damaged file is a `ConfigError` naming the file and the fix; no secret is ever
  part of a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from filelock import FileLock

from erp_pipelines.errors import ConfigError

PATH_VARIABLE = "ERP_TOKEN_STORE_PATH"
KEY_VARIABLE = "ERP_TOKEN_STORE_KEY"
DEFAULT_FILE_NAME = "tokens.enc"
KEY_FILE_NAME = "tokens.key"
OWNER_ONLY = 0o600


def credential_key(kind: str, *parts: str) -> str:
    """A stable entry name for a credential: `kind:` + a SHA-256 of its parts. The parts (base URL,
    tokens) are hashed, so the store's plaintext index never holds a secret."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
    return f"{kind}:{digest[:40]}"


def default_store_path(warehouse_path: str | os.PathLike[str],
                       environ: Mapping[str, str] | None = None) -> Path:
    """`ERP_TOKEN_STORE_PATH`, or `tokens.enc` in the folder of the warehouse at `warehouse_path`."""
    env = os.environ if environ is None else environ
    if env.get(PATH_VARIABLE):
        return Path(env[PATH_VARIABLE])
    return Path(warehouse_path).parent / DEFAULT_FILE_NAME


def validate_key(value: str, variable: str = KEY_VARIABLE) -> bytes:
    """A Fernet key from configuration, or `ConfigError` naming the variable (never the value)."""
    try:
        Fernet(value.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(
            f"{variable} is not a valid token store key (32 url-safe base64-encoded bytes)",
            fix='generate one with: python -c "from erp_pipelines.tokens import TokenStore; '
            'print(TokenStore.generate_key())"',
        ) from None
    return value.strip().encode("ascii")


class TokenStore:
    """A small encrypted key-value store of JSON values. Thread- and process-safe."""

    def __init__(self, path: str | os.PathLike[str], *, key: str | bytes | None = None,
                 key_path: str | os.PathLike[str] | None = None, lock_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path else self.path.with_name(KEY_FILE_NAME)
        self._given_key = key.encode("ascii") if isinstance(key, str) else key
        self._fernet: Fernet | None = None
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout)

    @classmethod
    def from_env(cls, warehouse_path: str | os.PathLike[str],
                 environ: Mapping[str, str] | None = None) -> TokenStore:
        """The store `ERP_TOKEN_STORE_PATH`/`_KEY` configure, by default next to the warehouse."""
        env = os.environ if environ is None else environ
        raw = env.get(KEY_VARIABLE)
        return cls(default_store_path(warehouse_path, env), key=validate_key(raw) if raw else None)

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode("ascii")

    def __repr__(self) -> str:  # never the key
        return f"TokenStore({str(self.path)!r})"

    # ------------------------------------------------------------------------------ public

    def get(self, name: str) -> Any:
        with self._locked():
            return self._read().get(name)

    def put(self, name: str, value: Any) -> None:
        self.update(name, lambda _old: value)

    def delete(self, name: str) -> None:
        with self._locked():
            document = self._read()
            if document.pop(name, None) is not None:
                self._write(document)

    def names(self, prefix: str = "") -> list[str]:
        """The entry names starting with `prefix` (names never hold a secret)."""
        with self._locked():
            return sorted(name for name in self._read() if name.startswith(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every entry whose name starts with `prefix` (one connection's cached tokens)."""
        with self._locked():
            document = self._read()
            doomed = [name for name in document if name.startswith(prefix)]
            for name in doomed:
                del document[name]
            if doomed:
                self._write(document)
            return len(doomed)

    def scoped(self, prefix: str) -> ScopedTokenStore:
        """A view whose entry names carry `prefix`: a stored connection's tokens, kept apart from
        every other connection's and deleted with it (`delete_prefix`)."""
        return ScopedTokenStore(self, prefix)

    def update(self, name: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write one entry under the lock (rotating refresh tokens: the new token is
        stored before anyone else can read the old one). `change` returning None deletes it."""
        with self._locked():
            document = self._read()
            value = change(document.get(name))
            if value is None:
                document.pop(name, None)
            else:
                document[name] = value
            self._write(document)
            return value

    # ------------------------------------------------------------------------------ file handling

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            self._fernet = Fernet(self._given_key if self._given_key else self._key_from_file())
        return self._fernet

    def _key_from_file(self) -> bytes:
        """The generated key file: created once (0600, never replaced), refused if others can read it."""
        with contextlib.suppress(FileExistsError):
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key())
                handle.flush()
                os.fsync(handle.fileno())
        _check_owner_only(self.key_path, "token store key file")
        key = self.key_path.read_bytes().strip()
        try:
            Fernet(key)
        except ValueError:
            raise ConfigError(
                f"the token store key file {self.key_path} does not hold a valid key",
                fix=f"restore it, or delete it together with {self.path} (cached sessions are simply re-created)",
            ) from None
        return key

    def _read(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        _check_owner_only(self.path, "token store")
        try:
            plain = self._cipher().decrypt(data)
        except InvalidToken:
            source = KEY_VARIABLE if self._given_key else f"the key file {self.key_path}"
            raise ConfigError(
                f"the token store {self.path} cannot be decrypted with the configured key ({source})",
                fix=f"set the key that wrote it, or delete {self.path}: cached sessions are re-created "
                "(OAuth refresh tokens then need the client's consent again)",
            ) from None
        document = json.loads(plain)
        if not isinstance(document, dict):
            raise ConfigError(f"the token store {self.path} is damaged", fix=f"delete {self.path}")
        return document

    def _write(self, document: dict[str, Any]) -> None:
        token = self._cipher().encrypt(json.dumps(document, sort_keys=True).encode("utf-8"))
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, OWNER_ONLY)
            with os.fdopen(fd, "wb") as handle:
                handle.write(token)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        with contextlib.suppress(OSError):  # make the rename durable
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class ScopedTokenStore:
    """`TokenStore.scoped`: the same file, lock and key; every entry name prefixed."""

    def __init__(self, store: TokenStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self.path = store.path

    def __repr__(self) -> str:
        return f"ScopedTokenStore({str(self.path)!r}, {self.prefix!r})"

    def get(self, name: str) -> Any:
        return self.store.get(self.prefix + name)

    def put(self, name: str, value: Any) -> None:
        self.store.put(self.prefix + name, value)

    def delete(self, name: str) -> None:
        self.store.delete(self.prefix + name)

    def update(self, name: str, change: Callable[[Any], Any]) -> Any:
        return self.store.update(self.prefix + name, change)


def _check_owner_only(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"the {what} {path} can be read by other users (mode {mode:o})",
            fix=f"chmod 600 {path}",
        )
