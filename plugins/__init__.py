"""momkit's built-in plugins, registered through the ``momkit`` entry-point group like any other."""
