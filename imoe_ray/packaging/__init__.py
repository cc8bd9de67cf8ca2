"""`.expert` packages: a signed, versioned archive of one PEFT adapter plus its manifest, and the
registry that installs them into a store (`STORE/registry/NAME/VERSION/`, the active one materialised
as `STORE/experts/NAME/`)."""


class PackageError(ValueError):
    """A package was refused or a registry operation cannot be done; the message says why."""
