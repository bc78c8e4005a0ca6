"""The one exception type users see: a problem with their input or their zoo, said in one line."""


class ZooError(Exception):
    """A user-facing error. The command line prints it as one line and exits with status 2."""


class StorageError(ZooError):
    """The root could not be written (a full disk, a read-only mount): nothing partial was kept,
    and no further model or metric can be stored, so a job stops instead of going on."""


class CatalogError(ZooError):
    """catalog.yaml is malformed; the message names the zoo and the field."""
