"""The ``ocrbatch`` command line: thin Click commands over the importable rooms beside this one."""
