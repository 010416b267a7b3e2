"""The ``thinslice`` command line: one module ``cmd_<name>.py`` per sub-command, discovered at start."""
