"""The one exception type users see: a problem with their input or their zoo, said in one line."""


class ZooError(Exception):
    """A user-facing error. The command line prints it as one line and exits with status 2."""


class CatalogError(ZooError):
    """catalog.yaml is malformed; the message names the zoo and the field."""
