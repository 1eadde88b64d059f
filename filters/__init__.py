"""Built-in filters of ispmailgate, one module each, and the interface they share.

Installed as ``ispmailgate_filters`` (the source folder is ``filters/``).  Third-party
filters register under the entry point group ``ispmailgate.filters``.
"""

# Type name -> "module:Class", imported only when a rule file names the type.
BUILTIN = {
    "dummy": "ispmailgate_filters.dummy:Dummy",
    "banner": "ispmailgate_filters.banner:Banner",
    "packer": "ispmailgate_filters.packer:Packer",
    "virscan": "ispmailgate_filters.virscan:VirScan",
    "pgp": "ispmailgate_filters.pgp:Pgp",
    "smime": "ispmailgate_filters.smime:Smime",
}
