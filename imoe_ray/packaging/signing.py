"""ed25519 signatures (pynacl) over a manifest's canonical JSON, and the trusted keys they are checked against.

Keys are 32 bytes written as hex; a trusted key in the config may be hex, base64 or a path to a
`.pub` file. The private key file is created with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from imoe_ray.packaging import PackageError
from imoe_ray.packaging.manifest import PackageManifest

ALGORITHM = "ed25519"
PRIVATE_NAME = "imoe-expert.key"
PUBLIC_NAME = "imoe-expert.pub"


@dataclass
class Signature:
    key: str        # the signer's public key, hex
    signature: str  # hex
    algorithm: str = ALGORITHM

    def to_json(self) -> dict:
        return {"algorithm": self.algorithm, "key": self.key, "signature": self.signature}

    @classmethod
    def from_json(cls, data: object) -> "Signature":
        if not isinstance(data, dict) or set(data) != {"algorithm", "key", "signature"} or data["algorithm"] != ALGORITHM:
            raise PackageError("signature.json must be {\"algorithm\": \"ed25519\", \"key\": hex, \"signature\": hex}")
        return cls(key=str(data["key"]), signature=str(data["signature"]))


def generate_keys(out_dir: Path) -> tuple[Path, Path]:
    """A new key pair in `out_dir` (private 0600, public); refuses to overwrite an existing key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    if private.exists() or public.exists():
        raise PackageError(f"{private} or {public} already exists; choose another --out directory")
    key = SigningKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.encode().hex() + "\n")
    public.write_text(key.verify_key.encode().hex() + "\n")
    return private, public


def load_signing_key(path: Path) -> SigningKey:
    if not path.is_file():
        raise PackageError(f"private key file not found: {path}")
    return SigningKey(_key_bytes(path.read_text().strip(), str(path)))


def parse_public_key(spec: str) -> str:
    """A trusted key as hex: `spec` is hex, base64, or a path to a file holding either."""
    text = spec.strip()
    if len(text) not in (43, 44, 64) and Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text().strip()
    return _key_bytes(text, spec).hex()


def _key_bytes(text: str, where: str) -> bytes:
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise PackageError(f"{where}: not an ed25519 key (32 bytes as hex or base64, or a key file)")
    return raw


def sign(manifest: PackageManifest, key: SigningKey) -> Signature:
    return Signature(key=key.verify_key.encode().hex(), signature=key.sign(manifest.canonical()).signature.hex())


def check(manifest: PackageManifest, signature: Signature) -> None:
    """Raise unless `signature` is a valid signature of `manifest` by the key it names."""
    try:
        VerifyKey(_key_bytes(signature.key, "signature key")).verify(manifest.canonical(), bytes.fromhex(signature.signature))
    except (BadSignatureError, ValueError):
        raise PackageError(f"the signature by key {signature.key[:16]}… does not match the manifest "
                           "(the package was altered after signing)") from None


def trust_status(manifest: PackageManifest, signature: Signature | None, trusted: list[str]) -> str:
    """'trusted', 'untrusted' (valid, by a key not in the config) or 'unsigned'; a bad signature raises."""
    if signature is None:
        return "unsigned"
    check(manifest, signature)
    return "trusted" if signature.key in {parse_public_key(k) for k in trusted} else "untrusted"
