"""Built-in filters of ispmailgate, a module or package each, and the interface they share.

Installed as ``ispmailgate_filters`` (the source folder is ``filters/``): a filter imports
its interface from ``ispmailgate_filters.base``, and a package of third-party filters
registers them under the entry point group of the same name, ``ispmailgate_filters``
(docs/writing-a-filter.md).  The group's old name, ``ispmailgate.filters``, is still read.
"""

# Where installed packages register filter types: the group first, then its old name.
ENTRY_POINT_GROUPS = ("ispmailgate_filters", "ispmailgate.filters")

# Type name -> "module:Class", imported only when a rule file names the type.
BUILTIN = {
    "dummy": "ispmailgate_filters.dummy:Dummy",
    "banner": "ispmailgate_filters.banner:Banner",
    "packer": "ispmailgate_filters.packer:Packer",
    "virscan": "ispmailgate_filters.virscan:VirScan",
    "pgp": "ispmailgate_filters.pgp:Pgp",
    "smime": "ispmailgate_filters.smime:Smime",
}
